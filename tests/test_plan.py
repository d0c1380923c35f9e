import math

import pytest

from selfcascade.plan import make_plan


def test_square_16x_pixels_has_two_cascade_stages():
    plan = make_plan(512, 2048, 2048, multiple=64)
    assert plan.stages == ((512, 512), (1024, 1024), (2048, 2048))
    assert plan.num_stages == 3


@pytest.mark.parametrize(
    "height,width,expected_stages",
    [(512, 512, 1), (640, 512, 2), (1024, 1024, 2), (1088, 1024, 3), (4096, 4096, 4)],
)
def test_stage_count_is_ceil_log4_of_pixel_ratio(height, width, expected_stages):
    plan = make_plan(512, height, width, multiple=64)
    ratio = height * width / 512**2
    assert plan.num_stages == 1 + math.ceil(math.log(ratio, 4) - 1e-9)
    assert plan.num_stages == expected_stages


def test_wide_target_keeps_aspect_ratio_and_multiples():
    plan = make_plan(512, 1536, 3072, multiple=64)
    assert plan.stages[-1] == (1536, 3072)
    assert plan.num_stages == 4  # 18x pixels -> ceil(log4 18) = 3 stages after the base
    for h, w in plan.stages:
        assert h % 64 == 0 and w % 64 == 0
        assert abs(w / h - 2.0) < 0.2
    # stage 0 keeps roughly the base pixel count
    h0, w0 = plan.stages[0]
    assert 0.7 < h0 * w0 / 512**2 < 1.3
    # pixel counts grow monotonically, each by at most ~4x
    pixels = [h * w for h, w in plan.stages]
    assert all(4.6 > b / a > 1 for a, b in zip(pixels, pixels[1:]))


def test_direct_is_one_stage_at_target():
    plan = make_plan(512, 2048, 1024, multiple=64, single_stage=True)
    assert plan.stages == ((2048, 1024),)


def test_plan_prints_every_stage():
    text = str(make_plan(32, 128, 128, multiple=4))
    assert "stage 0:" in text and "stage 2:" in text and "16.00x pixels" in text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=256, width=256), "fewer pixels than the base"),
        (dict(height=0, width=512), "positive integer"),
        (dict(height=-64, width=512), "positive integer"),
        (dict(height=1000, width=512), "not a multiple of 64.*use 960 or 1024"),
        (dict(height=16384, width=16384), "--max-ratio"),
    ],
)
def test_bad_targets_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_plan(512, multiple=64, **kwargs)


def test_max_ratio_can_be_raised():
    plan = make_plan(512, 16384, 16384, multiple=64, max_ratio=1024)
    assert plan.num_stages == 6
