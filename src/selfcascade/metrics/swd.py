"""Sliced Wasserstein distance on Laplacian pyramids (Karras et al. 2018, Progressive GAN, sec. 5).

Unlike FID/KID it needs no pretrained network, so it works offline, and it reports one number per
frequency band: the finest levels show whether an upscaling mode invents or smears detail, the
coarsest whether it keeps the layout. :class:`SWDDescriptors` gathers a set's descriptors batch by batch and
:func:`sliced_wasserstein_from_descriptors` compares two sets, so sets larger than memory stream through;
:func:`sliced_wasserstein_distance` does both for two sets in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .images import check_images, item_rng

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


class SWDDescriptors:
    """Laplacian-pyramid neighbourhoods of one image set, gathered batch by batch for
    :func:`sliced_wasserstein_from_descriptors`: SWD then needs memory for the descriptors, never the whole set.

    Per image and level, ``descriptors_per_image`` random ``patch_size``^2 neighbourhoods; image i's positions come
    from :func:`~.images.item_rng` (``seed``, i), so they depend neither on batching nor on order, and two sets
    gathered with one seed are compared at the same places (common random numbers: identical sets score exactly 0).
    Memory: 4 * descriptors_per_image * patch_size^2 * 3 bytes per image and level (75 KB at the defaults).
    """

    def __init__(self, *, descriptors_per_image: int = 128, patch_size: int = 7, min_size: int = 16,
                 seed: int = 0) -> None:
        if min_size < max(patch_size, 3):
            raise ValueError(f"min_size ({min_size}) must be at least patch_size ({patch_size}) and 3 (blur border)")
        self.descriptors_per_image, self.patch_size, self.min_size, self.seed = (
            descriptors_per_image, patch_size, min_size, seed)
        self.image_size: tuple[int, int] | None = None
        self.resolutions: list[int] = []
        self.count = 0
        self._chunks: list[list[torch.Tensor]] = []

    def add(self, images: torch.Tensor, first_index: int | None = None) -> None:
        """Gather the descriptors of ``images``, images ``first_index``, ``first_index`` + 1, ... of the set
        (default: those right after the images added so far)."""
        check_images(images)
        size = (images.shape[2], images.shape[3])
        if self.image_size is None:
            self.resolutions = _pyramid_resolutions(min(size), self.min_size)
            if not self.resolutions:
                raise ValueError(f"images ({size}) are smaller than min_size ({self.min_size})")
            self.image_size, self._chunks = size, [[] for _ in self.resolutions]
        elif size != self.image_size:
            raise ValueError(f"image sizes differ: {self.image_size} vs {size}")
        first = self.count if first_index is None else first_index
        n, per_image, patch = images.shape[0], self.descriptors_per_image, self.patch_size
        rngs = [item_rng(self.seed, first + i) for i in range(n)]
        which = torch.arange(n).repeat_interleave(per_image)
        offsets = torch.arange(patch)
        for level, band in enumerate(laplacian_pyramid(images.float(), len(self.resolutions))):
            height, width = band.shape[2:]
            tops = torch.from_numpy(np.concatenate([rng.integers(0, height - patch + 1, per_image) for rng in rngs]))
            lefts = torch.from_numpy(np.concatenate([rng.integers(0, width - patch + 1, per_image) for rng in rngs]))
            rows = (tops[:, None] + offsets)[:, :, None]
            cols = (lefts[:, None] + offsets)[:, None, :]
            self._chunks[level].append(band.permute(0, 2, 3, 1)[which[:, None, None], rows, cols])
        self.count += n

    def level(self, index: int) -> torch.Tensor:
        """Level ``index``'s descriptors ``[M, patch_size^2 * 3]``, normalised to zero mean and unit variance per
        channel over the whole set."""
        chunks = self._chunks[index]
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks)]  # once: later calls and adds do not copy the level again
        desc = chunks[0]  # [M, patch, patch, C]
        desc = (desc - desc.mean(dim=(0, 1, 2))) / desc.std(dim=(0, 1, 2), correction=0).clamp(min=1e-8)
        return desc.reshape(desc.shape[0], -1)


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


def sliced_wasserstein_from_descriptors(a: SWDDescriptors, b: SWDDescriptors, *, dir_repeats: int = 4,
                                         dirs_per_repeat: int = 128, seed: int = 1) -> SlicedWasserstein:
    """SWD between two sets' gathered descriptors, per pyramid level.

    When the sets differ in size, the larger one's descriptors are subsampled to the smaller count, since the
    sorted-projection distance compares equally many samples. Directions and subsampling come from ``seed``.
    """
    if not a.count or not b.count:
        raise ValueError(f"no images gathered ({a.count} and {b.count}); add images to both sets first")
    if a.image_size != b.image_size:
        raise ValueError(f"image sizes differ: {a.image_size} vs {b.image_size}")
    if (a.patch_size, a.min_size) != (b.patch_size, b.min_size):
        raise ValueError(f"descriptor settings differ: patch_size, min_size {(a.patch_size, a.min_size)} vs "
                         f"{(b.patch_size, b.min_size)}")
    generator = torch.Generator().manual_seed(seed)
    per_level = []
    for level in range(len(a.resolutions)):
        desc_a, desc_b = a.level(level), b.level(level)
        count = min(desc_a.shape[0], desc_b.shape[0])
        if desc_a.shape[0] > count:
            desc_a = desc_a[torch.randperm(desc_a.shape[0], generator=generator)[:count]]
        if desc_b.shape[0] > count:
            desc_b = desc_b[torch.randperm(desc_b.shape[0], generator=generator)[:count]]
        per_level.append(_sliced_w1(desc_a, desc_b, dir_repeats, dirs_per_repeat, generator))
    return SlicedWasserstein(resolutions=a.resolutions, per_level=per_level, mean=sum(per_level) / len(per_level))


def sliced_wasserstein_distance(images_a: torch.Tensor, images_b: torch.Tensor, *,
                                descriptors_per_image: int = 128, patch_size: int = 7, min_size: int = 16,
                                dir_repeats: int = 4, dirs_per_repeat: int = 128, batch_size: int = 64,
                                seed: int = 0) -> SlicedWasserstein:
    """SWD between two image sets of one size in memory, per Laplacian level down to ``min_size`` pixels:
    :class:`SWDDescriptors` of each set (``batch_size`` images at a time), then
    :func:`sliced_wasserstein_from_descriptors`. For sets too large for memory, use those two directly.

    Defaults are Karras et al.'s: 7x7 neighbourhoods, 128 per image, 4 repeats of 128 random
    directions, levels from full size down to 16 px. Each set's descriptors are normalised with
    its own per-channel statistics, as there, so a per-level change of brightness or contrast
    alone is not counted; changes of local structure (blur, noise, artefacts) are.

    Both sets draw neighbourhood positions from ``seed``, image i of each at the same places (common random
    numbers; Karras et al. drew them independently): identical sets then score exactly 0 instead of a sampling
    noise floor, which matters with the few hundred images evaluated here. Directions and subsampling come from
    ``seed + 1``. ``batch_size`` bounds memory only: positions are per image, so it changes no number.
    """
    check_images(images_a)
    check_images(images_b)
    if images_a.shape[2:] != images_b.shape[2:]:
        raise ValueError(f"image sizes differ: {tuple(images_a.shape[2:])} vs {tuple(images_b.shape[2:])}")
    gathered = []
    for images in (images_a, images_b):
        descriptors = SWDDescriptors(descriptors_per_image=descriptors_per_image, patch_size=patch_size,
                                     min_size=min_size, seed=seed)
        for start in range(0, images.shape[0], batch_size):
            descriptors.add(images[start:start + batch_size])
        gathered.append(descriptors)
    return sliced_wasserstein_from_descriptors(*gathered, dir_repeats=dir_repeats, dirs_per_repeat=dirs_per_repeat,
                                               seed=seed + 1)
