"""Temporal consistency of a clip whose true motion is known (the synthetic emoji motion clips).

A clip that moves as its ground truth says has frame t+1 equal to frame t carried along by that motion,
so the *warping error* (mean |warp(frame t) - frame t+1| over pixels that frame t can supply) is ~0 for
a consistent clip and large for flicker or objects that change from frame to frame. The plain *frame
difference* (mean |frame t+1 - frame t|) needs no motion and is reported beside it: a clip that barely
changes scores low on it even when it ignores the motion it was asked for.

Convention (the one ``selfcascade.data.emoji_clips`` renders with, kept here once): ``theta[t]`` is a
2x3 affine in torch's normalised coordinates (x right, y down, -1..1 over the frame, ``align_corners=False``)
that maps frame-t coordinates to the coordinates of a fixed canvas, i.e.
``frame_t = grid_sample(canvas, affine_grid(theta[t]))``. On square frames these are pixel rotations,
translations and scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: A sample point counts as inside a frame when bilinear sampling takes this much weight from inside.
_VALID_WEIGHT = 1 - 1e-4


def _homogeneous(theta: torch.Tensor) -> torch.Tensor:
    """[N, 2, 3] affines -> [N, 3, 3] matrices (so they compose and invert)."""
    bottom = torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device).expand(theta.shape[0], 1, 3)
    return torch.cat([theta, bottom], dim=1)


def affine_warp(images: torch.Tensor, theta: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``images`` [N, C, H, W] at ``theta`` [N, 2, 3] (bilinear); returns (warped, valid [N, 1, H, W]).

    Points outside the image read ``fill`` (blended at the border as if the image continued in ``fill``);
    ``valid`` marks output pixels whose sample point lies wholly inside the image.
    """
    if images.ndim != 4 or theta.shape != (images.shape[0], 2, 3):
        raise ValueError(f"expected images [N, C, H, W] and theta [N, 2, 3], got {tuple(images.shape)} and "
                         f"{tuple(theta.shape)}.")
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    warped = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    ones = torch.ones_like(images[:, :1])
    valid = F.grid_sample(ones, grid, mode="bilinear", padding_mode="zeros", align_corners=False) >= _VALID_WEIGHT
    return warped, valid


def next_frame_motion(theta: torch.Tensor) -> torch.Tensor:
    """[F, 2, 3] per-frame affines -> [F-1, 2, 3] affines that warp frame t onto frame t+1.

    frame_{t+1}(p) = canvas(theta_{t+1} p) = frame_t(theta_t^{-1} theta_{t+1} p).
    """
    full = _homogeneous(theta.double())
    return (torch.linalg.inv(full[:-1]) @ full[1:])[:, :2].to(theta.dtype)


def _check_clip(clip: torch.Tensor) -> None:
    if clip.ndim != 4 or clip.shape[0] < 2:
        raise ValueError(f"expected one clip [F, C, H, W] with F >= 2 frames, got shape {tuple(clip.shape)}.")


def warping_error(clip: torch.Tensor, theta: torch.Tensor) -> float:
    """Mean |warp(frame t) - frame t+1| over valid pixels and channels, averaged over consecutive pairs.

    ``clip`` [F, C, H, W] in [0, 1]; ``theta`` [F, 2, 3] its true per-frame motion (see the module notes).
    """
    _check_clip(clip)
    if theta.shape != (clip.shape[0], 2, 3):
        raise ValueError(f"theta must be [F, 2, 3] with F = {clip.shape[0]} frames of the clip, got "
                         f"{tuple(theta.shape)}; pass the clip's motion cut to the frames compared.")
    clip = clip.float()
    warped, valid = affine_warp(clip[:-1], next_frame_motion(theta.float()))
    error = (warped - clip[1:]).abs().mean(dim=1, keepdim=True)  # [F-1, 1, H, W]
    counts = valid.flatten(1).sum(1)
    if (counts == 0).any():
        raise ValueError("the motion moves a frame wholly out of view: no pixel is comparable between two frames.")
    return ((error * valid).flatten(1).sum(1) / counts).mean().item()


def frame_difference(clip: torch.Tensor) -> float:
    """Mean |frame t+1 - frame t| over pixels, channels and consecutive pairs; ``clip`` [F, C, H, W]."""
    _check_clip(clip)
    clip = clip.float()
    return (clip[1:] - clip[:-1]).abs().mean().item()


def temporal_consistency(clip: torch.Tensor, theta: torch.Tensor) -> dict[str, float]:
    """Both numbers for one clip: ``warping_error`` (lower: follows its motion) and ``frame_difference``."""
    return {"warping_error": warping_error(clip, theta), "frame_difference": frame_difference(clip)}


__all__ = ["affine_warp", "frame_difference", "next_frame_motion", "temporal_consistency", "warping_error"]
