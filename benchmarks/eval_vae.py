"""Reconstruction quality of an embedded VAE on the eval split: PSNR, feature FID, edge crispness and grids per size.

    python benchmarks/eval_vae.py --vae src/selfcascade/embedded_v3/vae --sizes 128 256 512 1024 --count 16

Eval-split renders (concepts never trained on) are encoded (posterior mode) and decoded. Per size:

- PSNR over [0, 1] pixels (mean and worst image);
- FID of the reconstructions against the same renders in the project's emoji features
  (``selfcascade.metrics.EmojiFeatures``, which resizes to its 64 px input): how far the VAE moves images in
  the features the paper's tables use. With a few images FID is biased upwards; compare only equal counts;
- edge ratio: mean Sobel gradient magnitude of the reconstructions over that of the renders, over the set
  (and the lowest per image). 1 keeps outlines as sharp as the renders; blurring lowers it;
- colour error: mean absolute difference of the 8x8-pixel block means, in 0-255 levels: a shift of flat colours
  (reds drawn orange) that PSNR, dominated by edges, hides;
- encode + decode seconds per image.

Sizes above the data set's largest (512 px) are rendered from the npm packages' SVGs in the data cache with the
renderer that made the data set, so outlines at 1024 px are judged against true 1024 px renders, not upscales.
Grids show renders above their reconstructions: whole images up to 256 px, above that 192 px crops at 100%
zoom where the render has the most edges.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from selfcascade.data.emoji import collect_items, default_cache_dir, read_manifest, render_svg
from selfcascade.data.loader import load_images
from selfcascade.grid import make_grid
from selfcascade.io import save_png
from selfcascade.metrics import EmojiFeatures, frechet_distance

CROP = 192  # side of the 100% zoom crops in the grids of large sizes
GRID_COLUMNS = 6


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """uint8 renders -> reconstructions in [0, 1]."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].float() / 127.5 - 1.0
        out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1))
    return (torch.cat(out) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def sobel_magnitude(images: torch.Tensor) -> torch.Tensor:
    """Per-pixel Sobel gradient magnitude of each channel of ``[N, 3, H, W]`` images (valid border only)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T])[:, None].repeat(3, 1, 1, 1)  # [6, 1, 3, 3]: x, y per channel
    g = F.conv2d(images.float(), kernels, groups=3)
    return g.unflatten(1, (3, 2)).pow(2).sum(2).sqrt()


def edge_ratio(recon: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """(set ratio, lowest per-image ratio) of the mean Sobel magnitude of ``recon`` over that of ``real``."""
    a, b = sobel_magnitude(recon).mean(dim=(1, 2, 3)), sobel_magnitude(real).mean(dim=(1, 2, 3))
    return float(a.sum() / b.sum()), float((a / b.clamp_min(1e-8)).min())


def colour_error(recon: torch.Tensor, real: torch.Tensor) -> float:
    """Mean absolute difference of 8x8 block means in 0-255 levels: low-frequency colour shift, blind to edges."""
    return float((F.avg_pool2d(recon, 8) - F.avg_pool2d(real, 8)).abs().mean() * 255)


def edgiest_crop(image: torch.Tensor, crop: int) -> tuple[int, int]:
    """Top-left corner of the ``crop`` window (on a crop/4 lattice) with the most Sobel gradient in ``image``."""
    energy = F.avg_pool2d(sobel_magnitude(image[None]).mean(1, keepdim=True), crop, stride=crop // 4)[0, 0]
    row, col = divmod(int(energy.argmax()), energy.shape[1])
    return row * (crop // 4), col * (crop // 4)


def eval_images(cache_dir: Path, records: list[dict], size: int) -> tuple[torch.Tensor, str]:
    """uint8 renders of ``records`` at ``size`` and where they came from: the data cache, else the packages' SVGs."""
    if (cache_dir / "images" / str(size)).is_dir():
        return load_images(cache_dir, records, size, "eval", progress=False), "data set renders"
    items = {item.id: item for item in collect_items(cache_dir / "packages", sorted({r["source"] for r in records}))}
    rendered = [torch.from_numpy(np.asarray(render_svg(items[r["id"]].svg, size))) for r in records]
    return torch.stack(rendered).permute(0, 3, 1, 2).contiguous(), "rendered from the SVGs"


def to_pil(image: torch.Tensor) -> Image.Image:
    """A float [0, 1] or uint8 ``[3, H, W]`` image as PIL."""
    if image.is_floating_point():
        image = (image * 255).round().byte()
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def grid_for(images: torch.Tensor, recon: torch.Tensor) -> Image.Image:
    real, decoded, labels = [], [], []
    for i in range(min(GRID_COLUMNS, len(images))):
        x, r = images[i], recon[i]
        if images.shape[-1] > 256:
            top, left = edgiest_crop(x.float() / 255, CROP)
            x, r = (t[:, top:top + CROP, left:left + CROP] for t in (x, r))
        real.append(to_pil(x))
        decoded.append(to_pil(r))
        labels.append(str(i))
    return make_grid([real, decoded], ["render", "VAE"], labels)


def main() -> None:
    from diffusers import AutoencoderKL

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vae", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--count", type=int, default=64, help="eval-split images (the same ones at every size)")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vae_embedded"))
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    features = EmojiFeatures()
    cache_dir = args.cache_dir or default_cache_dir()
    records = [r for r in read_manifest(cache_dir) if r["split"] == "eval"]
    g = torch.Generator().manual_seed(0)
    records = [records[i] for i in torch.randperm(len(records), generator=g)[:args.count].tolist()]
    lines = [f"# VAE reconstruction on {len(records)} eval-split renders ({args.vae})", "",
             f"`{shlex.join(['python', *sys.argv])}` ({args.threads} torch thread(s))", "",
             f"| size | images | PSNR (dB) mean | min | FID ({features.name}) | edge ratio | min | colour error | s / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        images, origin = eval_images(cache_dir, records, size)
        t0 = time.perf_counter()
        recon = reconstruct(vae, images, batch_size=max(1, 16 * 128 ** 2 // size ** 2))
        seconds = (time.perf_counter() - t0) / len(images)
        real = images.float() / 255
        p = psnr(recon, real)
        fid = frechet_distance(features(real), features(recon))
        ratio, worst = edge_ratio(recon, real)
        lines.append(f"| {size} ({origin}) | {len(images)} | {p.mean():.2f} | {p.min():.2f} | {fid:.2f} | "
                     f"{ratio:.3f} | {worst:.3f} | {colour_error(recon, real):.2f} | {seconds:.2f} |")
        print(lines[-1], flush=True)
        save_png(grid_for(images, recon), args.out.with_name(f"{args.out.name}_{size}.png"))
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
