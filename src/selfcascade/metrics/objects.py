"""Count the separate foreground objects of images on a plain background: how often a subject is repeated.

Why: direct inference far above a model's trained size repeats the subject (at 16x the pixels the emoji model draws
two, four or a tiling of emoji where the caption asks for one), while the cascade keeps the base model's single
layout. FID and SWD register this only vaguely; a count of objects names it. `selfcascade evaluate` reports the
mean count per image and the share of images with more than one object, beside the same numbers for the real
renders at that size (a few emoji legitimately have several parts: "sparkles", "dashing away", some flags).

How, per image (:func:`count_objects`):

1. resize to ``side`` x ``side`` px (128 by default; antialiased), so thresholds mean the same at every size;
2. background colour: the per-channel median of the border pixels;
3. foreground: pixels differing from it by more than ``threshold`` in some channel (0.1, about 25 of 255 levels:
   above antialiasing haze and sampling noise, below any emoji colour on white);
4. a binary closing (dilate, then erode, by ``closing`` px) bridges hairline gaps, so an outline broken by
   antialiasing or a thin white line through a shape leaves one object;
5. holes filled: background not connected to the image border (the white of an eye, a clock's face, the inside
   of a ring) belongs to the object around it, so white details do not split an emoji into pieces;
6. 8-connected components, counting those that cover at least ``min_area`` (1%) of the image; smaller specks
   (noise, a stray dot, a detached sparkle) are ignored.

Limits: meaningful only for images of separate objects on a single-colour background, like the emoji renders on
white. A photograph (``--real``) has no such background and gives meaningless counts, so `evaluate` reports n/a
then. Objects that touch or overlap count as one; parts more than ``2 * closing`` px apart (at ``side`` px) count
separately, so multi-part emoji count above one (compare with the real renders' row); a shape whose outline has
the background colour (white on white) is missed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .images import check_images, resize_images

SIDE = 128
THRESHOLD = 0.1
CLOSING = 1
MIN_AREA = 0.01


def foreground_masks(images: torch.Tensor, side: int = SIDE, threshold: float = THRESHOLD,
                     closing: int = CLOSING) -> torch.Tensor:
    """Boolean ``[N, side, side]`` foreground of float ``[N, 3, H, W]`` images in [0, 1] (steps 1-4 above; holes
    not yet filled)."""
    check_images(images)
    images = resize_images(images.float(), side) if images.shape[-2:] != (side, side) else images.float()
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]], dim=-1)
    background = border.median(dim=-1).values  # [N, 3]
    mask = ((images - background[..., None, None]).abs().amax(dim=1) > threshold).float()[:, None]
    if closing > 0:
        kernel = 2 * closing + 1
        mask = F.max_pool2d(mask, kernel, stride=1, padding=closing)  # dilation
        # erosion; max_pool pads with -inf, so outside the image counts as foreground and nothing erodes from the edge
        mask = 1 - F.max_pool2d(1 - mask, kernel, stride=1, padding=closing)
    return mask[:, 0] > 0.5


def label_components(mask: np.ndarray, diagonal: bool = True) -> tuple[np.ndarray, int]:
    """Connected components of a boolean ``[H, W]`` mask: int32 labels (0 off the mask, 1..K on it) and K.
    ``diagonal``: 8-connected (pixels touching at a corner join), else 4-connected.

    One pass over the rows' runs of ``True`` with a union-find, linear in the number of runs (no scipy needed)."""
    mask = np.asarray(mask, dtype=bool)
    parent: list[int] = []
    runs: list[tuple[int, int, int]] = []  # (row, start, stop) of every run, in order

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    reach = 1 if diagonal else 0  # a run above touches [start - reach, stop + reach)
    previous: list[tuple[int, int, int]] = []  # (start, stop, run id) of the row above, left to right
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate(([False], row, [False])).astype(np.int8)))
        current = []
        j = 0
        for start, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):  # True in [start, stop)
            run = len(parent)
            parent.append(run)
            runs.append((y, start, stop))
            while j < len(previous) and previous[j][1] + reach <= start:  # wholly left of this run's reach
                j += 1
            k = j
            while k < len(previous) and previous[k][0] < stop + reach:
                a, b = find(run), find(previous[k][2])
                if a != b:
                    parent[b] = a
                k += 1
            current.append((start, stop, run))
        previous = current
    labels = np.zeros(mask.shape, dtype=np.int32)
    names: dict[int, int] = {}
    for run, (y, start, stop) in enumerate(runs):
        labels[y, start:stop] = names.setdefault(find(run), len(names) + 1)
    return labels, len(names)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every region of ``False`` that does not reach the border set ``True``: the white of an eye,
    a clock's face, the inside of a ring belong to their object. The background is 4-connected (the foreground 8-)."""
    labels, _ = label_components(~np.asarray(mask, dtype=bool), diagonal=False)
    outside = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ~np.isin(labels, outside[outside > 0])


def component_areas(mask: np.ndarray) -> list[int]:
    """Pixel areas of the 8-connected components of a boolean ``[H, W]`` mask, largest first."""
    labels, count = label_components(mask)
    return sorted(np.bincount(labels.ravel(), minlength=count + 1)[1:].tolist(), reverse=True)


def count_objects(images: torch.Tensor, side: int = SIDE, threshold: float = THRESHOLD, closing: int = CLOSING,
                  min_area: float = MIN_AREA) -> list[int]:
    """Separate foreground objects in each of float ``[N, 3, H, W]`` images in [0, 1] on a plain background: the
    components of :func:`foreground_masks` covering at least ``min_area`` of the image (see the module docstring)."""
    smallest = min_area * side * side
    return [sum(area >= smallest for area in component_areas(fill_holes(mask)))
            for mask in foreground_masks(images, side, threshold, closing).numpy()]
