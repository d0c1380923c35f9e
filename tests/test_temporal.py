"""Temporal consistency under known motion (selfcascade.metrics.temporal): known cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfcascade.metrics.temporal import (affine_warp, frame_difference, next_frame_motion, temporal_consistency,
                                          warping_error)

FRAMES, SIDE = 6, 48


def _smooth_image(seed: int = 0) -> torch.Tensor:
    """[3, SIDE, SIDE] in [0, 1]: upsampled coarse noise, smooth enough that resampling twice loses little."""
    coarse = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(SIDE, SIDE), mode="bicubic", align_corners=False).clamp(0, 1)[0]


def _motion(kind: str) -> torch.Tensor:
    """[FRAMES, 2, 3]: a shift of whole pixels per frame, or a spin of 8 degrees per frame with a drift."""
    theta = torch.zeros(FRAMES, 2, 3)
    t = torch.arange(FRAMES, dtype=torch.float32)
    if kind == "shift":
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2], theta[:, 1, 2] = -t * 2 * 2 / SIDE, t * 1 * 2 / SIDE  # 2 px right, 1 px up per frame
    else:
        alpha = t * math.radians(8)
        theta[:, 0, 0] = theta[:, 1, 1] = alpha.cos()
        theta[:, 0, 1], theta[:, 1, 0] = alpha.sin(), -alpha.sin()
        theta[:, 0, 2] = -t * 0.03
    return theta


def _clip(kind: str) -> torch.Tensor:
    theta = _motion(kind)
    frames, _ = affine_warp(_smooth_image().expand(FRAMES, -1, -1, -1), theta, fill=1.0)
    return frames


@pytest.mark.parametrize("kind,tolerance", [("shift", 1e-5), ("spin", 0.01)])
def test_a_clip_made_by_warping_one_image_scores_about_zero(kind, tolerance):
    clip = _clip(kind)
    scores = temporal_consistency(clip, _motion(kind))
    assert scores["warping_error"] < tolerance
    assert scores["frame_difference"] > 5 * max(scores["warping_error"], 0.005)  # the clip does move


def test_noise_frames_score_high_and_shuffled_frames_higher_than_ordered():
    noise = torch.rand(FRAMES, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    assert warping_error(noise, _motion("spin")) > 0.25  # uniform noise: E|a - b| = 1/3, less the blur of warping
    assert frame_difference(noise) == pytest.approx(1 / 3, abs=0.01)
    clip, theta = _clip("spin"), _motion("spin")
    shuffled = clip[torch.tensor([0, 3, 1, 5, 2, 4])]
    assert warping_error(shuffled, theta) > 3 * warping_error(clip, theta)
    assert frame_difference(shuffled) > frame_difference(clip)


def test_static_clip_with_identity_motion_scores_zero_and_motion_composes():
    still = _smooth_image().expand(FRAMES, -1, -1, -1)
    identity = torch.eye(2, 3).expand(FRAMES, 2, 3)
    scores = temporal_consistency(still, identity)
    assert scores["warping_error"] < 1e-6 and scores["frame_difference"] == 0.0
    theta = _motion("spin")
    relative = next_frame_motion(theta)
    full = torch.cat([theta, torch.tensor([0.0, 0, 1]).expand(FRAMES, 1, 3)], 1)
    rel_full = torch.cat([relative, torch.tensor([0.0, 0, 1]).expand(FRAMES - 1, 1, 3)], 1)
    torch.testing.assert_close(full[:-1] @ rel_full, full[1:], atol=1e-6, rtol=0)


def test_pixels_moved_in_from_outside_are_not_counted():
    clip, theta = _clip("shift"), _motion("shift")  # content moves right and up: new pixels enter left and bottom
    clip[-1, :, :, :2] = torch.rand(3, SIDE, 2)  # whatever the last frame shows there is not judged
    clip[-1, :, -1, :] = torch.rand(3, SIDE)
    assert warping_error(clip, theta) < 1e-5
    _, valid = affine_warp(clip[:-1], next_frame_motion(theta))
    assert not valid[..., :2].any() and not valid[..., -1, :].any() and valid[..., :-1, 2:].all()


@pytest.mark.parametrize("clip,theta,message", [
    (torch.rand(1, 3, 8, 8), torch.zeros(1, 2, 3), r"F >= 2 frames"),
    (torch.rand(3, 8, 8), torch.zeros(3, 2, 3), r"one clip \[F, C, H, W\]"),
    (torch.rand(4, 3, 8, 8), torch.zeros(3, 2, 3), r"theta must be \[F, 2, 3\] with F = 4"),
])
def test_bad_shapes_are_explained(clip, theta, message):
    with pytest.raises(ValueError, match=message):
        warping_error(clip, theta)


def test_motion_out_of_view_is_explained():
    theta = torch.eye(2, 3).repeat(2, 1, 1)
    theta[1, 0, 2] = 3.0  # frame 1 shows what lies far right of frame 0
    with pytest.raises(ValueError, match="wholly out of view"):
        warping_error(torch.rand(2, 3, 8, 8), theta)
