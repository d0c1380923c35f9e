"""Reconstruction quality of an embedded VAE on the eval split: PSNR per size and a grid.

    python benchmarks/eval_vae.py --vae runs/vae-export --sizes 128 256 --count 64

Eval-split renders (concepts never trained on) are encoded (posterior mode) and decoded; PSNR is over
[0, 1] pixels. The grid shows renders above their reconstructions, per size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from selfcascade.data.emoji import default_cache_dir, read_manifest
from selfcascade.data.loader import load_images
from selfcascade.grid import make_grid
from selfcascade.io import save_png


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 127.5 - 1.0
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1))
    return (torch.cat(out) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vae_embedded"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    cache_dir = args.cache_dir or default_cache_dir()
    records = [r for r in read_manifest(cache_dir) if r["split"] == "eval"]
    g = torch.Generator().manual_seed(0)
    records = [records[i] for i in torch.randperm(len(records), generator=g)[:args.count].tolist()]
    lines = [f"# VAE reconstruction on {args.count} eval-split renders ({args.vae})", "",
             "| size | PSNR (dB) mean | min | s / image |", "|---|---|---|---|"]
    for size in args.sizes:
        images = load_images(cache_dir, records, size, "eval")
        t0 = time.perf_counter()
        recon = reconstruct(vae, images)
        seconds = (time.perf_counter() - t0) / len(images)
        p = psnr(recon, images.float() / 255)
        lines.append(f"| {size} | {p.mean():.2f} | {p.min():.2f} | {seconds:.3f} |")
        real = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images[:6]]
        decoded = [Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in recon[:6]]
        grid = make_grid([real, decoded], ["render", "VAE"], [str(i) for i in range(len(real))])
        save_png(grid, args.out.with_name(f"{args.out.name}_{size}.png"))
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
