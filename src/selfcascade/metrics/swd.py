"""Sliced Wasserstein distance on Laplacian pyramids (Karras et al. 2018, Progressive GAN, sec. 5).

Unlike FID/KID it needs no pretrained network, so it works offline, and it reports one number per
frequency band: the finest levels show whether an upscaling mode invents or smears detail, the
coarsest whether it keeps the layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import check_images

# 5-tap binomial filter [1, 4, 6, 4, 1] / 16 in both directions, as in Burt & Adelson's pyramid.
_TAPS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


@dataclass(frozen=True)
class SlicedWasserstein:
    """SWD per pyramid level, finest first, and their mean; ``resolutions`` are the levels' shorter sides.

    Unit: the Wasserstein-1 distance between projected descriptors, each set's descriptors being
    normalised to zero mean and unit variance per channel, i.e. in descriptor standard deviations.
    Karras et al. print these values multiplied by 1e3.
    """

    resolutions: list[int]
    per_level: list[float]
    mean: float


def _blur(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.outer(_TAPS, _TAPS).to(x)[None, None].expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first, then the low-pass residual (``levels`` tensors in all).

    Downsampling blurs then drops every other pixel; upsampling inserts zeros then blurs with gain 4,
    with mirror borders, as in Karras et al.'s reference implementation.
    """
    pyramid = []
    current = images
    for _ in range(levels - 1):
        lower = _blur(current)[..., ::2, ::2]
        upsampled = torch.zeros_like(current)
        upsampled[..., ::2, ::2] = lower
        pyramid.append(current - 4 * _blur(upsampled))
        current = lower
    pyramid.append(current)
    return pyramid


def _pyramid_resolutions(side: int, min_size: int) -> list[int]:
    """Shorter side of each level (dropping every other pixel keeps ceil(side / 2))."""
    resolutions = []
    while side >= min_size:
        resolutions.append(side)
        side = (side + 1) // 2
    return resolutions


def _descriptors(images: torch.Tensor, levels: int, per_image: int, patch_size: int, batch_size: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Per level, ``per_image`` random ``patch_size``^2 neighbourhoods of every image, normalised per channel."""
    per_level: list[list[torch.Tensor]] = [[] for _ in range(levels)]
    offsets = torch.arange(patch_size)
    for start in range(0, images.shape[0], batch_size):
        for level, band in enumerate(laplacian_pyramid(images[start:start + batch_size].float(), levels)):
            n, _, height, width = band.shape
            which = torch.arange(n).repeat_interleave(per_image)
            tops = torch.randint(0, height - patch_size + 1, (n * per_image,), generator=generator)
            lefts = torch.randint(0, width - patch_size + 1, (n * per_image,), generator=generator)
            rows = (tops[:, None] + offsets)[:, :, None]
            cols = (lefts[:, None] + offsets)[:, None, :]
            per_level[level].append(band.permute(0, 2, 3, 1)[which[:, None, None], rows, cols])
    normalised = []
    for chunks in per_level:
        desc = torch.cat(chunks)  # [M, patch, patch, C]
        desc = (desc - desc.mean(dim=(0, 1, 2))) / desc.std(dim=(0, 1, 2), correction=0).clamp(min=1e-8)
        normalised.append(desc.reshape(desc.shape[0], -1))
    return normalised


def _sliced_w1(a: torch.Tensor, b: torch.Tensor, dir_repeats: int, dirs_per_repeat: int,
               generator: torch.Generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance of the projections."""
    total = 0.0
    for _ in range(dir_repeats):
        dirs = torch.randn(a.shape[1], dirs_per_repeat, generator=generator)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        proj_a = (a @ dirs).sort(dim=0).values
        proj_b = (b @ dirs).sort(dim=0).values
        total += float((proj_a - proj_b).abs().mean())
    return total / dir_repeats


def sliced_wasserstein_distance(images_a: torch.Tensor, images_b: torch.Tensor, *,
                                descriptors_per_image: int = 128, patch_size: int = 7, min_size: int = 16,
                                dir_repeats: int = 4, dirs_per_repeat: int = 128, batch_size: int = 64,
                                seed: int = 0) -> SlicedWasserstein:
    """SWD between two image sets of one size, per Laplacian level down to ``min_size`` pixels.

    Defaults are Karras et al.'s: 7x7 neighbourhoods, 128 per image, 4 repeats of 128 random
    directions, levels from full size down to 16 px. Each set's descriptors are normalised with
    its own per-channel statistics, as there, so a per-level change of brightness or contrast
    alone is not counted; changes of local structure (blur, noise, artefacts) are. When the sets
    differ in size, the larger one's descriptors are subsampled to the smaller count, since the
    sorted-projection distance compares equally many samples.

    Both sets draw neighbourhood positions from the same ``seed`` (common random numbers; Karras
    et al. drew them independently): identical sets then score exactly 0 instead of a sampling
    noise floor, which matters with the few hundred images evaluated here. Directions and
    subsampling come from ``seed + 1``.
    """
    check_images(images_a)
    check_images(images_b)
    if images_a.shape[2:] != images_b.shape[2:]:
        raise ValueError(f"image sizes differ: {tuple(images_a.shape[2:])} vs {tuple(images_b.shape[2:])}")
    if min_size < max(patch_size, 3):
        raise ValueError(f"min_size ({min_size}) must be at least patch_size ({patch_size}) and 3 (blur border)")
    resolutions = _pyramid_resolutions(min(images_a.shape[2:]), min_size)
    if not resolutions:
        raise ValueError(f"images ({tuple(images_a.shape[2:])}) are smaller than min_size ({min_size})")
    levels = len(resolutions)
    desc_a, desc_b = (
        _descriptors(images, levels, descriptors_per_image, patch_size, batch_size,
                     torch.Generator().manual_seed(seed))
        for images in (images_a, images_b)
    )
    generator = torch.Generator().manual_seed(seed + 1)
    per_level = []
    for a, b in zip(desc_a, desc_b):
        count = min(a.shape[0], b.shape[0])
        a = a[torch.randperm(a.shape[0], generator=generator)[:count]] if a.shape[0] > count else a
        b = b[torch.randperm(b.shape[0], generator=generator)[:count]] if b.shape[0] > count else b
        per_level.append(_sliced_w1(a, b, dir_repeats, dirs_per_repeat, generator))
    return SlicedWasserstein(resolutions=resolutions, per_level=per_level, mean=sum(per_level) / levels)
