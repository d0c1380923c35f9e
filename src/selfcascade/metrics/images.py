"""Image-set preparation for the paper's metric variants (section 5.2 and the design's evaluation).

- FID_r / KID_r: generated images at the target size against real images at the target size.
- pFID / pKID: random base-size crops of both sets (:func:`random_crops`), so detail at the new
  scale is judged at the resolution the feature extractor sees, not averaged away by resizing.
- FID_b / KID_b: generated images downsampled to the base size (:func:`resize_images`) against the
  base model's own samples, i.e. how much of the base model's behaviour survives the adaptation.

Images are float tensors ``[N, 3, H, W]`` in [0, 1] throughout.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Size = int | tuple[int, int]


def _pair(size: Size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return height, width


def check_images(images: torch.Tensor) -> None:
    """Reject anything but float ``[N, 3, H, W]`` images, the one layout every metric here expects."""
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")


def resize_images(images: torch.Tensor, size: Size, mode: str = "bicubic") -> torch.Tensor:
    """Resize with antialiasing (area-weighted when downsampling) and clamp back to [0, 1].

    Antialiasing matters: Parmar et al. 2022 (clean-fid) show aliased resizing alone shifts FID by
    several points. Bicubic overshoots at edges, hence the clamp.
    """
    check_images(images)
    resized = F.interpolate(images, size=_pair(size), mode=mode, antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def item_rng(seed: int, index: int) -> np.random.Generator:
    """The random numbers owned by image ``index`` of a set: a function of (seed, index) only, so whatever is drawn
    from it (crop and neighbourhood positions) does not depend on how the set is split into batches or processes.

    numpy's SeedSequence spawn keys give every index its own independent stream of one root seed."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be non-negative, got seed {seed}, index {index}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def random_crops(images: torch.Tensor, size: Size, crops_per_image: int, seed: int,
                 first_index: int = 0) -> torch.Tensor:
    """``crops_per_image`` uniformly placed crops from every image, image-major: ``[N * k, 3, h, w]``.

    Crops lie fully inside their image. Image j of ``images`` is image ``first_index + j`` of its set and its crops
    come from :func:`item_rng` (seed, that index), so a set cropped batch by batch gets the crops it gets whole.
    """
    check_images(images)
    crop_h, crop_w = _pair(size)
    n, _, height, width = images.shape
    if crop_h > height or crop_w > width:
        raise ValueError(f"crop {crop_h}x{crop_w} is larger than the images ({height}x{width})")
    if crops_per_image < 1:
        raise ValueError(f"crops_per_image must be >= 1, got {crops_per_image}")
    crops = []
    for i in range(n):
        rng = item_rng(seed, first_index + i)
        tops = rng.integers(0, height - crop_h + 1, crops_per_image).tolist()
        lefts = rng.integers(0, width - crop_w + 1, crops_per_image).tolist()
        crops += [images[i, :, top:top + crop_h, left:left + crop_w] for top, left in zip(tops, lefts)]
    return torch.stack(crops)
