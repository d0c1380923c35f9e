"""Image sets that are read a batch at a time: what `selfcascade evaluate` scores.

Why: at the paper's scale (10k images at 2048 px, about 50 MB each as float32) no set fits in memory, so a set is
its count, its image size and a reader of images ``[start, stop)``; scoring (:mod:`selfcascade.scoring`) asks for
one batch at a time. Building a set reads only file headers (sizes), so a bad folder fails before any scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageSet:
    """``count`` images of one ``size`` (height, width); ``read(start, stop)`` returns images ``[start, stop)`` as
    float ``[n, 3, H, W]`` in [0, 1], built anew on every call (nothing is cached)."""

    count: int
    size: tuple[int, int]
    read: Callable[[int, int], torch.Tensor]

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` images (fewer if the set is smaller): for grids."""
        return self.read(0, min(n, self.count))

    def read_all(self) -> torch.Tensor:
        """Every image at once: for small sets only (benchmarks, tests); scoring reads batches."""
        return self.read(0, self.count)

    @classmethod
    def of_tensor(cls, images: torch.Tensor) -> "ImageSet":
        """A set already in memory (float ``[N, 3, H, W]`` in [0, 1])."""
        return cls(images.shape[0], (images.shape[2], images.shape[3]), lambda start, stop: images[start:stop])


def as_image_set(images: ImageSet | torch.Tensor) -> ImageSet:
    return images if isinstance(images, ImageSet) else ImageSet.of_tensor(images)


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float ``[N, 3, H, W]`` in [0, 1]."""
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images differ in size ({sorted(sizes)}); score one size per folder")
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2).float() / 255


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels."""
    with Image.open(path) as im:
        return im.size


def file_set(paths: Sequence[Path], prepare: Callable[[Image.Image], Image.Image] | None = None,
             size: tuple[int, int] | None = None) -> ImageSet:
    """The images in ``paths``, each converted to RGB and passed through ``prepare`` when given. ``size`` (height,
    width) is what ``prepare`` makes; without it every file must have one size (checked from the headers now)."""
    paths = list(paths)
    if size is None:
        sizes = {_header_size(p) for p in paths}
        if len(sizes) != 1:
            raise ValueError(f"images differ in size ({sorted(sizes)}); score one size per folder")
        width, height = sizes.pop()
        size = (height, width)

    def read(start: int, stop: int) -> torch.Tensor:
        images = []
        for path in paths[start:stop]:
            with Image.open(path) as im:
                rgb = im.convert("RGB")
            images.append(prepare(rgb) if prepare is not None else rgb)
        return to_tensor(images)

    return ImageSet(len(paths), size, read)


def folder_set(folder: Path) -> ImageSet:
    """Every image in ``folder`` (sorted by name), all of one size."""
    files = image_files(folder)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return file_set(files)


def real_folder_set(folder: Path, size: int, count: int) -> ImageSet:
    """The first ``count`` images of ``folder`` (sorted by name) whose shorter side is at least ``size``, each
    centre-cropped to a square and resized to ``size`` (PIL bicubic, antialiased, as clean-fid resizes).

    Smaller images are skipped, not enlarged: like the paper's filter of LAION to images above the target size,
    so the reference holds real detail at that size."""
    files = image_files(Path(folder)) if Path(folder).is_dir() else []
    if not files:
        raise FileNotFoundError(f"--real {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) there")
    usable, skipped = [], 0
    for path in files:
        if len(usable) == count:
            break
        if min(_header_size(path)) < size:
            skipped += 1
        else:
            usable.append(path)
    if skipped:
        logger.warning("--real %s: skipped %d image(s) smaller than %d px on their shorter side", folder, skipped, size)
    if not usable:
        raise ValueError(f"--real {folder}: no image is at least {size} px on its shorter side")
    if len(usable) < count:
        logger.warning("--real %s: %d usable image(s) at %d px, fewer than --num-real %d", folder, len(usable), size,
                       count)

    def centre_square(im: Image.Image) -> Image.Image:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        return im.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)

    return file_set(usable, centre_square, (size, size))


def emoji_renders(cache_dir: Path, records: list[dict], size: int) -> ImageSet:
    """The emoji data set's renders of ``records`` at ``size`` px (see `selfcascade data build`)."""
    from .data.loader import load_images

    def read(start: int, stop: int) -> torch.Tensor:
        return load_images(cache_dir, records[start:stop], size, "eval", progress=False).float() / 255

    return ImageSet(len(records), (size, size), read)
