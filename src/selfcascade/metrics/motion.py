"""Which motion a clip shows, in the words the emoji motion clips are captioned with.

The motion clips (``selfcascade.data.emoji_clips``) end their captions in "moving up and left", "spinning
clockwise", "bouncing", ... . ``motion_words`` reads such words back off any clip of one object on a plain
background, generated or real: the foreground's centroid gives the translation and a search over rotations
about it gives the spin. Comparing a generated clip's words with its prompt's measures whether a video model
follows motion words; the real clips, whose words are true, measure the reader itself.

Coordinates as in ``selfcascade.metrics.temporal``: torch's normalised frame coordinates, x right, y down,
-1..1 across the frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .images import resize_images

#: Sectors of the 8-way compass used to name a direction (sin 22.5 degrees).
_COMPASS = math.sin(math.pi / 8)
BOUNCE_WORDS = "bouncing"
STILL_WORDS = "still"
#: A pixel is foreground when its colour differs from the background's by this much (mean over channels, 0..1).
_FOREGROUND = 0.1
#: Side at which spins are searched: enough for a 2-degree step, cheap for 41 candidates.
_SPIN_SIDE = 64


def direction_words(dx: float, dy: float) -> str:
    """A direction (y down) -> "moving up and left", "moving right", ... (8 compass sectors)."""
    norm = math.hypot(dx, dy)
    if norm == 0:
        raise ValueError("a direction needs a non-zero (dx, dy).")
    dx, dy = dx / norm, dy / norm
    vertical = "up" if dy < -_COMPASS else "down" if dy > _COMPASS else ""
    horizontal = "left" if dx < -_COMPASS else "right" if dx > _COMPASS else ""
    return "moving " + " and ".join(w for w in (vertical, horizontal) if w)


def spin_words(clockwise: bool) -> str:
    return "spinning clockwise" if clockwise else "spinning counterclockwise"


def motion_kind(words: str) -> str:
    """Motion words -> their kind: translate, rotate, bounce or still."""
    if words.startswith("moving "):
        return "translate"
    if words.startswith("spinning "):
        return "rotate"
    if words == BOUNCE_WORDS:
        return "bounce"
    if words == STILL_WORDS:
        return "still"
    raise ValueError(f"not motion words: {words!r}.")


def _check_square_clip(clip: torch.Tensor) -> None:
    if clip.ndim != 4 or clip.shape[0] < 2 or clip.shape[1] != 3 or clip.shape[-1] != clip.shape[-2]:
        raise ValueError(f"expected one RGB clip [F, 3, S, S] of square frames and F >= 2, got {tuple(clip.shape)}.")


def foreground(clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [F, 1, S, S] of the object, background colour [3]): the background is the border's median colour."""
    border = torch.cat([clip[..., 0, :], clip[..., -1, :], clip[..., 0], clip[..., -1]], dim=-1)  # [F, 3, 4S]
    background = border.permute(1, 0, 2).flatten(1).median(dim=1).values
    mask = (clip - background[:, None, None]).abs().mean(dim=1, keepdim=True) > _FOREGROUND
    return mask.float(), background


def centroids(mask: torch.Tensor) -> torch.Tensor:
    """[F, 1, S, S] masks -> [F, 2] (x, y) centroids in normalised coordinates; the centre for an empty mask."""
    side = mask.shape[-1]
    axis = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1  # pixel centres, align_corners=False
    weight = mask[:, 0].flatten(1).sum(1).clamp_min(1e-8)
    x = (mask[:, 0] * axis[None, None, :]).flatten(1).sum(1) / weight
    y = (mask[:, 0] * axis[None, :, None]).flatten(1).sum(1) / weight
    return torch.stack([x, y], dim=1)


def _turned(frame: torch.Tensor, degrees: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
            fill: torch.Tensor) -> torch.Tensor:
    """``frame`` [3, S, S] turned clockwise (on screen) by each of ``degrees`` [N] about ``source``, moved to
    ``target``: [N, 3, S, S]. A point p of the result reads the frame at R(-a) (p - target) + source."""
    a = torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # R(-a), y down: [N, 2, 2]
    shift = source[None, :, None] - inverse @ target[None, :, None]
    theta = torch.cat([inverse, shift], dim=2)
    images = (frame - fill[:, None, None]).expand(len(degrees), -1, -1, -1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill[:, None, None]


def spins(clip: torch.Tensor, max_degrees: float = 40.0, step: float = 2.0) -> torch.Tensor:
    """[F-1] turn from each frame to the next, in degrees, clockwise on screen positive: the rotation about the
    object's centroid that best carries frame t onto frame t+1 (mean absolute error; searched at 64 px). No turn
    unless one fits better: a blank frame or a disc does not spin."""
    _check_square_clip(clip)
    small = resize_images(clip.float(), _SPIN_SIDE) if clip.shape[-1] > _SPIN_SIDE else clip.float()
    mask, background = foreground(small)
    centres = centroids(mask)
    half = torch.arange(step, max_degrees + step / 2, step)
    candidates = torch.cat([-half.flip(0), torch.zeros(1), half])  # 0 at index len(half), whatever the step
    best = []
    for t in range(len(small) - 1):
        turned = _turned(small[t], candidates, centres[t], centres[t + 1], background)
        errors = (turned - small[t + 1]).abs().flatten(1).mean(1)
        no_turn = errors[len(half)]
        best.append(candidates[errors.argmin()] if errors.min() < no_turn - 1e-6 else candidates.new_zeros(()))
    return torch.stack(best)


def motion_words(clip: torch.Tensor, min_spin: float = 5.0, min_shift: float = 0.15) -> str:
    """The motion words a clip [F, 3, S, S] in [0, 1] shows: "spinning clockwise|counterclockwise" when the
    median turn per frame is at least ``min_spin`` degrees; else "bouncing" when the centroid's vertical
    path is longer than its net vertical shift by at least ``min_shift`` (it turns back; normalised units, 2 =
    the frame's side) and longer than its horizontal path; else "moving <direction>" of the net shift of its centroid when that is at
    least ``min_shift``; else "still"."""
    _check_square_clip(clip)
    turn = spins(clip).median().item()
    if abs(turn) >= min_spin:
        return spin_words(turn > 0)
    mask, _ = foreground(clip.float())
    path = centroids(mask)
    travel = (path[1:] - path[:-1]).abs().sum(0)  # (x, y) distance covered, back and forth
    net = path[-1] - path[0]
    if travel[1] - net[1].abs() >= min_shift and travel[1] > travel[0]:
        return BOUNCE_WORDS
    if net.norm() >= min_shift:
        return direction_words(net[0].item(), net[1].item())
    return STILL_WORDS


__all__ = ["BOUNCE_WORDS", "STILL_WORDS", "centroids", "direction_words", "foreground", "motion_kind", "motion_words",
           "spin_words", "spins"]
