"""Direct vs tuning-free (vs tuned) on the embedded model's eval split: sliced Wasserstein distances.

    python benchmarks/eval_modes.py --sizes 64 128 256 --num 32 --steps 50

For each target size, every mode generates one image per caption for ``--num`` captions drawn (seeded)
from the eval split, whose concepts no training run has seen. Two distances to the real eval images,
both sliced Wasserstein on Laplacian pyramids (Karras et al. 2018; no network needed, lower is better):

- ``SWD_r``: generated images vs real eval images rendered at the target size (all pyramid levels);
- ``SWD_b``: generated images downsampled to the base size vs real eval images at the base size: the
  global layout, where direct inference duplicates objects and breaks shapes.

A first, small measurement until the full evaluation (FID/KID on a trained feature extractor) exists.
Results: benchmarks/results/modes_<model>.{md,csv} and a grid of the first captions.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_inference import RESULTS, device_name, write_results
from selfcascade import SelfCascadePipeline
from selfcascade.data.emoji import default_cache_dir, read_manifest
from selfcascade.data.loader import load_images
from selfcascade.grid import make_grid
from selfcascade.metrics import resize_images, sliced_wasserstein_distance


def load_real(records: list[dict], size: int, cache_dir: Path) -> torch.Tensor:
    return load_images(cache_dir, records, size, "eval").float() / 255


def generate(cascade: SelfCascadePipeline, captions: list[str], size: int, mode: str, args) -> tuple[torch.Tensor, float]:
    """One image per caption (caption i gets seed i), in batches; returns images in [0, 1] and s/image."""
    images, start = [], time.perf_counter()
    for i in range(0, len(captions), args.batch):
        chunk = captions[i:i + args.batch]
        out = cascade(chunk, size, size, mode=mode, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      seed=list(range(i, i + len(chunk))), output_type="pt", progress=False,
                      upsamplers=args.upsamplers if mode == "tuned" else None)
        images.append(out.images.float().cpu())
    return torch.cat(images), (time.perf_counter() - start) / len(captions)


def run(args: argparse.Namespace) -> None:
    """Writes the results after every size, so an interrupted run keeps what it measured."""
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    eval_records = [r for r in read_manifest(cache_dir) if r["split"] == "eval"]
    chosen = random.Random(args.seed).sample(eval_records, args.num)
    captions = [r["caption"] for r in chosen]
    reference = random.Random(args.seed + 1).sample(eval_records, min(len(eval_records), args.num_real))
    cascade = SelfCascadePipeline.from_pretrained(args.model)
    base = cascade.backbone.base_size[0]
    real_base = load_real(reference, base, cache_dir)
    rows, grid_rows, grid_labels = [], [], []
    for size in args.sizes:
        real = load_real(reference, size, cache_dir)
        for mode in args.modes:
            fake, seconds = generate(cascade, captions, size, mode, args)
            swd_r = sliced_wasserstein_distance(fake, real, seed=args.seed)
            swd_b = sliced_wasserstein_distance(resize_images(fake, base), real_base, seed=args.seed)
            rows.append({
                "model": args.model, "size": size, "pixels": f"{(size / base) ** 2:g}x", "mode": mode,
                "SWD_r_x1e3": round(1e3 * swd_r.mean, 2), "SWD_b_x1e3": round(1e3 * swd_b.mean, 2),
                "s_per_image": round(seconds, 2), "n_generated": len(captions), "n_real": len(reference),
            })
            print(rows[-1], flush=True)
            grid_rows.append([Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                              for im in fake[:args.grid_captions]])
            grid_labels.append(f"{mode} {size}")
        columns = [c.split(",")[0][:12] for c in captions[:args.grid_captions]]
        write(rows, make_grid(grid_rows, grid_labels, columns, cell=args.grid_cell), args)



def write(rows: list[dict], grid: Image.Image, args: argparse.Namespace) -> None:
    stem = RESULTS / f"modes_{Path(args.model).name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    grid.save(stem.with_suffix(".png"))
    device = device_name(args.threads)
    lines = [
        f"# Direct vs self-cascade on the eval split ({args.model})", "",
        f"{args.num} eval captions (seed {args.seed}), one image each; {args.num_real} real eval images per "
        f"size; {args.steps} DDIM steps, guidance {args.guidance or 'model default'}; {device}. Sliced Wasserstein "
        "distance on Laplacian pyramids x1e3, lower is better. Command: `python benchmarks/eval_modes.py "
        f"--sizes {' '.join(map(str, args.sizes))} --num {args.num} --steps {args.steps}`.", "",
        "| size | pixels | mode | SWD_r | SWD_b | s / image |", "|---|---|---|---|---|---|",
        *[f"| {r['size']} | {r['pixels']} | {r['mode']} | {r['SWD_r_x1e3']} | {r['SWD_b_x1e3']} | {r['s_per_image']} |"
          for r in rows],
        "", f"![grid]({stem.with_suffix('.png').name})", "",
    ]
    write_results(stem, rows, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--modes", nargs="+", default=["direct", "tuning-free"])
    parser.add_argument("--upsamplers", default=None, help="bank for mode 'tuned'")
    parser.add_argument("--num", type=int, default=32, help="eval captions (one generated image each)")
    parser.add_argument("--num-real", type=int, default=512, help="real eval images per size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's own")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--grid-captions", type=int, default=6)
    parser.add_argument("--grid-cell", type=int, default=96)
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()
