"""How far to re-noise the pivot: the tuning-free cascade at several K on the embedded model's eval split.

    python benchmarks/k_sweep.py --sizes 64 128 --ks 200 300 494 --num-images 16 --steps 25

For every size and K: FID_r, pFID_r, FID_b and SWD of ``selfcascade evaluate`` (same captions, seeds and
reference renders as ``bench_table.py``), and a figure of every stage for a few held-out captions at each K,
so a metric that cannot see a broken face is checked by eye. Writes
``benchmarks/results/k_sweep_<model>.{md,csv}`` and ``docs/images/k-scan.png``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from selfcascade import SelfCascadePipeline
from selfcascade.backbones.base import PIVOT_SPACES
from selfcascade.data.emoji import default_cache_dir, read_manifest
from selfcascade.evaluate import choose_records
from selfcascade.grid import make_grid
from selfcascade.image_sets import emoji_renders
from selfcascade.io import atomic_path
from selfcascade.metrics import load_features
from selfcascade.model_card import HELD_OUT_CAPTIONS
from selfcascade.scoring import make_reference, score

from bench_inference import device_name, write_results

ROOT = Path(__file__).resolve().parent.parent
FIGURE_CAPTIONS = HELD_OUT_CAPTIONS[0], HELD_OUT_CAPTIONS[2], HELD_OUT_CAPTIONS[4]


def generate(pipe: SelfCascadePipeline, captions: list[str], size: int, mode: str, steps: int, **kwargs) -> torch.Tensor:
    """Caption i with seed i, as float [N, 3, H, W] in [0, 1]."""
    return torch.cat([pipe(c, size, size, mode=mode, num_inference_steps=steps, seed=i, output_type="pt",
                           progress=False, **kwargs).images.float().cpu() for i, c in enumerate(captions)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[200, 300, 494])
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--num-real", type=int, default=512)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "images" / "k-scan.png")
    parser.add_argument("--pivot-space", choices=PIVOT_SPACES, default="latent",
                        help="how pivots are upsampled (pixel: decode, resize, encode; results get a _pixel suffix)")
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder of k_sweep_<model>.{md,csv}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = SelfCascadePipeline.from_pretrained(args.model)
    base = pipe.backbone.base_size[0]
    cache_dir = default_cache_dir()
    records = read_manifest(cache_dir)
    captions = [r["caption"] for r in choose_records(records, args.num_images, args.seed)]
    reference_records = choose_records(records, args.num_real, args.seed + 1)
    extractor = load_features("auto", None, device=pipe.backbone.device)
    base_features = extractor(generate(pipe, captions, base, "direct", args.steps))

    rows = []
    for size in args.sizes:
        reference = make_reference(extractor, emoji_renders(cache_dir, reference_records, size), base, 4, args.seed)
        for k in args.ks:
            fake = generate(pipe, captions, size, "tuning-free", args.steps, K=k, pivot_space=args.pivot_space)
            metrics = score(extractor, fake, reference, base_features, base, 4, args.seed)
            rows.append({"size": size, "K": k, **{m: round(metrics[m], 2) for m in ("FID_r", "pFID_r", "FID_b", "SWD_x1e3")},
                         "n_gen": metrics["n_gen"], "default_K": pipe.backbone.default_k})
            print(rows[-1], flush=True)

    name = Path(args.model).name
    figure_link = os.path.relpath(args.figure.resolve(), args.results.resolve())
    lines = [f"# The tuning-free cascade at several K on the `{name}` model ({args.pivot_space} pivots)", "",
             f"Device: {device_name(args.threads)}. {args.num_images} eval-split captions, {args.steps} DDIM steps, "
             f"{args.num_real} real renders per size, features `{extractor.name}`; the model's default K is "
             f"{pipe.backbone.default_k}. Lower is better. Command: `python benchmarks/k_sweep.py --model {args.model} "
             f"--sizes {' '.join(map(str, args.sizes))} --ks {' '.join(map(str, args.ks))} --num-images {args.num_images} "
             f"--steps {args.steps} --pivot-space {args.pivot_space}`. Figure: [{args.figure.name}]({figure_link}).", "",
             "| size | K | FID_r | pFID_r | FID_b | SWD x1e3 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['size']} | {r['K']} | {r['FID_r']} | {r['pFID_r']} | {r['FID_b']} | {r['SWD_x1e3']} |" for r in rows]
    suffix = "_pixel" if args.pivot_space == "pixel" else ""
    write_results(args.results / f"k_sweep_{name}{suffix}", rows, lines)

    scan_figure(pipe, max(args.sizes), args.ks, args.steps, args.figure, args.pivot_space)


def scan_figure(pipe: SelfCascadePipeline, size: int, ks: list[int], steps: int, path: Path,
                pivot_space: str) -> None:
    """Every stage of the tuning-free cascade for a few held-out captions (seed 0), one row per caption and K."""
    cells, labels = [], []
    for caption in FIGURE_CAPTIONS:
        for k in ks:
            out = pipe(caption, size, size, mode="tuning-free", num_inference_steps=steps, seed=0, K=k,
                       pivot_space=pivot_space, return_stages=True, progress=False)
            cells.append([stage[0] for stage in out.stages])
            labels.append(f"{caption.split(',')[0]}, K={k}")
    sides = [f"{h} px" for h, _ in pipe.plan(size, size, "tuning-free").stages]
    with atomic_path(path) as tmp:
        make_grid(cells, labels, sides, cell=96).save(tmp, format="PNG")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
