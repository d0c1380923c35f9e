"""The motion-words reader (selfcascade.metrics.motion) on clips whose motion is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from selfcascade.data.emoji_clips import MOTIONS, make_motion, render_clip
from selfcascade.metrics.motion import direction_words, motion_kind, motion_words, spins

SIDE = 128


def _emoji() -> Image.Image:
    """An asymmetric stand-in emoji (a disc with an off-centre mark), so that its spins show."""
    image = Image.new("RGB", (SIDE, SIDE), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((16, 16, SIDE - 16, SIDE - 16), fill="#e22")
    draw.rectangle((32, 32, 64, 48), fill="black")
    return image


def _clip(motion) -> torch.Tensor:
    frames = render_clip(_emoji(), motion, [SIDE])[SIDE]
    return torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("kind", MOTIONS)
def test_reads_the_words_each_clip_was_captioned_with(kind):
    for seed in range(4):
        motion = make_motion("stand-in", kind, seed, 8, SIDE)
        assert motion_words(_clip(motion)) == motion.words, (kind, seed)


def test_spins_measure_the_turn_and_its_sense():
    motion = make_motion("stand-in", "rotate", 0, 8, SIDE)
    step = np.degrees(np.arctan2(motion.theta[1, 0, 1], motion.theta[1, 0, 0]))  # alpha per frame, clockwise > 0
    turns = spins(_clip(motion))
    assert turns.shape == (7,)
    assert torch.allclose(turns, torch.full((7,), float(step)), atol=3.0)


def test_a_clip_that_does_not_move_is_still_and_a_moved_one_is_not():
    frame = _clip(make_motion("stand-in", "translate", 0, 8, SIDE))[:1]
    assert motion_words(frame.repeat(8, 1, 1, 1)) == "still"
    assert motion_words(torch.ones(8, 3, 64, 64)) == "still"  # nothing drawn: no turn fits better than none
    shifted = torch.cat([torch.roll(frame, shifts=4 * t, dims=-1) for t in range(8)])  # 28 px to the right
    assert motion_words(shifted) == "moving right"


def test_direction_words_name_eight_compass_sectors():
    assert direction_words(1, 0) == "moving right"
    assert direction_words(-1, -1) == "moving up and left"
    assert direction_words(0.1, 1) == "moving down"
    with pytest.raises(ValueError, match="non-zero"):
        direction_words(0, 0)


def test_kinds_and_bad_input():
    assert [motion_kind(w) for w in ("moving down and right", "spinning counterclockwise", "bouncing", "still")] == [
        "translate", "rotate", "bounce", "still"]
    with pytest.raises(ValueError, match="not motion words"):
        motion_kind("dancing")
    with pytest.raises(ValueError, match="square frames"):
        motion_words(torch.zeros(8, 3, 32, 48))
