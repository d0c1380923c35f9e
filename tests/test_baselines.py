"""Training-free baselines as modes of ``SelfCascadePipeline``: attn-sf, redilate, hires-fix.

Tiny offline pipelines (native 32x32 px), 2-3 DDIM steps. With 3 steps of T=1000 the schedule is
667, 334, 1, so redilate (t > 600) is active at the first step only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from selfcascade import SelfCascadePipeline
from selfcascade import cli, pipeline
from selfcascade.baselines import (
    BASELINE_MODES, ScaledSelfAttnProcessor, redilated, redilation_factor, scaled_self_attention, strength_to_k,
)
from selfcascade.baselines.redilation import redilated_convs
from selfcascade.plan import make_plan

PROMPT = "a red apple"
FAST = dict(num_inference_steps=2, progress=False, output_type="np", seed=0)
STEPS3 = dict(FAST, num_inference_steps=3)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return SelfCascadePipeline.from_pipe(tiny_sd)


@pytest.fixture(scope="module")
def direct_64(sd):
    return sd(PROMPT, 64, 64, mode="direct", **FAST).images


def _processors(unet) -> dict[str, object]:
    return {name: m.processor for name, m in unet.named_modules() if isinstance(m, Attention)}


def _convs(unet) -> dict[str, tuple]:
    return {name: (m.dilation, m.padding) for name, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}


def _fail_at_first_step(*args) -> None:
    raise RuntimeError("stop")


# ---------------------------------------------------------------------------------- every mode
@pytest.mark.parametrize("mode", BASELINE_MODES)
@pytest.mark.parametrize("fixture,height,width", [("tiny_sd", 64, 64), ("tiny_sd", 64, 128), ("tiny_sdxl", 64, 64)])
def test_every_baseline_returns_the_target_size(mode, fixture, height, width, request):
    out = SelfCascadePipeline.from_pipe(request.getfixturevalue(fixture))(PROMPT, height, width, mode=mode, **FAST)
    assert out.images.shape == (1, height, width, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0.01
    assert out.settings["mode"] == mode and out.plan.target == (height, width)


def test_cli_offers_every_mode():
    assert cli.MODES is pipeline.MODES  # one list, in selfcascade.modes
    parser = cli.build_parser()
    for mode in BASELINE_MODES:
        assert parser.parse_args(["generate", PROMPT, "--mode", mode]).mode == mode
    args = parser.parse_args(["generate", PROMPT, "--mode", "hires-fix", "--strength", "0.6"])
    assert (args.strength, args.pivot_space) == (0.6, None)  # None: the mode's own pivot space
    assert parser.parse_args(["compare", PROMPT, "--modes", *BASELINE_MODES]).modes == list(BASELINE_MODES)


# ------------------------------------------------------------------------------------- attn-sf
def test_attn_sf_factor_is_sqrt_log_ntrain_n():
    processor = ScaledSelfAttnProcessor(token_ratio=4.0)
    assert processor.logit_factor(64) == pytest.approx(math.sqrt(math.log(64) / math.log(16)))
    assert ScaledSelfAttnProcessor(1.0).logit_factor(256) == 1.0
    assert ScaledSelfAttnProcessor(0.25).logit_factor(64) < 1.0  # fewer tokens than in training: flatter
    with pytest.raises(ValueError, match="token_ratio must be positive"):
        ScaledSelfAttnProcessor(0.0)


def test_attn_sf_changes_the_image_above_the_base_size_only(sd, direct_64):
    assert np.abs(sd(PROMPT, 64, 64, mode="attn-sf", **FAST).images - direct_64).max() > 1e-4
    direct_32 = sd(PROMPT, 32, 32, mode="direct", **FAST).images
    np.testing.assert_array_equal(sd(PROMPT, 32, 32, mode="attn-sf", **FAST).images, direct_32)  # factor 1


def test_attn_sf_scales_self_attention_only(tiny_sd_fresh):
    unet = tiny_sd_fresh.unet
    seen: list[tuple[str, type]] = []

    def record(*args) -> None:
        seen.extend((name, type(m.processor)) for name, m in unet.named_modules() if isinstance(m, Attention))

    SelfCascadePipeline.from_pipe(tiny_sd_fresh)(PROMPT, 64, 64, mode="attn-sf", callback=record, **FAST)
    assert seen and {name.rsplit(".", 1)[-1] for name, _ in seen} == {"attn1", "attn2"}
    for name, kind in seen:
        assert (kind is ScaledSelfAttnProcessor) == name.endswith("attn1")


def test_attn_sf_restores_the_processors_also_on_error(tiny_sd_fresh):
    unet = tiny_sd_fresh.unet
    before = _processors(unet)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    cascade(PROMPT, 64, 64, mode="attn-sf", **FAST)
    assert _processors(unet) == before  # the very same processor objects
    with pytest.raises(RuntimeError, match="stop"):
        cascade(PROMPT, 64, 64, mode="attn-sf", callback=_fail_at_first_step, **FAST)
    assert _processors(unet) == before


def test_attn_sf_needs_self_attention():
    with pytest.raises(ValueError, match="no self-attention layers"):
        with scaled_self_attention(torch.nn.Conv2d(1, 1, 3), 4.0):
            pass


# ------------------------------------------------------------------------------------ redilate
def test_redilation_factor():
    assert [redilation_factor(r) for r in (0.25, 1, 2, 4, 9, 16)] == [1, 1, 1, 2, 3, 4]


def test_redilated_convs_are_the_deeper_3x3_ones(tiny_sd):
    unet = tiny_sd.unet
    names = {id(m): n for n, m in unet.named_modules()}
    chosen = [names[id(m)] for m in redilated_convs(unet)]
    assert chosen and all(n.startswith(("down_blocks.1.", "mid_block.", "up_blocks.0.")) for n in chosen)
    assert "up_blocks.0.upsamplers.0.conv" in chosen
    everything = [names[id(m)] for m in redilated_convs(unet, undilated_levels=0)]
    assert "conv_in" not in everything and "conv_out" not in everything
    assert any(n.startswith("down_blocks.0.") for n in everything)
    assert all(m.kernel_size == (3, 3) for m in redilated_convs(unet, undilated_levels=0))
    with pytest.raises(ValueError, match=r"undilated_levels must lie in \[0, 2\]"):
        redilated_convs(unet, undilated_levels=3)


def test_redilate_dilates_deep_convs_at_high_timesteps_only(tiny_sd_fresh):
    unet = tiny_sd_fresh.unet
    deep, shallow = unet.mid_block.resnets[0].conv1, unet.down_blocks[0].resnets[0].conv1
    calls: list[tuple] = []
    handles = [conv.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, m.dilation, m.padding)))
               for name, conv in (("deep", deep), ("shallow", shallow))]
    try:
        SelfCascadePipeline.from_pipe(tiny_sd_fresh)(PROMPT, 64, 64, mode="redilate", **STEPS3)  # t = 667, 334, 1
    finally:
        for handle in handles:
            handle.remove()
    assert [(d, p) for name, d, p in calls if name == "deep"] == [((2, 2), (2, 2))] + [((1, 1), (1, 1))] * 2
    assert {(d, p) for name, d, p in calls if name == "shallow"} == {((1, 1), (1, 1))}


def test_redilate_changes_the_image_and_leaves_the_unet_as_it_was(tiny_sd_fresh):
    unet = tiny_sd_fresh.unet
    convs, weights = _convs(unet), {k: v.clone() for k, v in unet.state_dict().items()}
    hooks = (dict(unet._forward_pre_hooks), dict(unet._forward_hooks))
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    direct = cascade(PROMPT, 64, 64, mode="direct", **STEPS3).images
    assert np.abs(cascade(PROMPT, 64, 64, mode="redilate", **STEPS3).images - direct).max() > 1e-3
    with pytest.raises(RuntimeError, match="stop"):
        cascade(PROMPT, 64, 64, mode="redilate", callback=_fail_at_first_step, **STEPS3)
    assert _convs(unet) == convs
    assert (dict(unet._forward_pre_hooks), dict(unet._forward_hooks)) == hooks
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    np.testing.assert_array_equal(cascade(PROMPT, 64, 64, mode="direct", **STEPS3).images, direct)


def test_redilated_checks_its_arguments(tiny_sd):
    for kwargs, message in ((dict(dilation=0), "dilation must be a positive integer"),
                            (dict(dilation=1.5), "dilation must be a positive integer"),
                            (dict(dilation=2, above=1.5), r"above must lie in \[0, 1\]")):
        with pytest.raises(ValueError, match=message):
            with redilated(tiny_sd.unet, num_train_timesteps=1000, **kwargs):
                pass


# ----------------------------------------------------------------------------------- hires-fix
def test_single_jump_plan():
    assert make_plan(512, 2048, 2048, multiple=64, single_jump=True).stages == ((512, 512), (2048, 2048))
    assert make_plan(512, 512, 512, multiple=64, single_jump=True).stages == ((512, 512),)


@pytest.mark.parametrize("strength,tail", [(0.5, [334, 1]), (0.7, [667, 334, 1]), (0.3, [1])])
def test_hires_fix_jumps_once_and_runs_the_timesteps_up_to_strength_T(sd, strength, tail):
    steps: list[tuple[int, int]] = []
    encodes: list[tuple] = []
    backbone = sd.backbone
    encode = backbone.encode
    backbone.encode = lambda images: encodes.append(tuple(images.shape)) or encode(images)
    try:
        out = sd(PROMPT, 64, 64, mode="hires-fix", strength=strength, return_stages=True,
                 callback=lambda r, i, t, latents: steps.append((r, int(t))), **STEPS3)
    finally:
        del backbone.encode
    assert out.plan.stages == ((32, 32), (64, 64)) and [s.shape for s in out.stages] == [(1, 32, 32, 3), (1, 64, 64, 3)]
    assert [t for r, t in steps if r == 0] == [667, 334, 1]
    assert [t for r, t in steps if r == 1] == tail
    assert encodes == [(1, 3, 64, 64)]  # the base image is upscaled in pixels, then encoded
    assert out.settings["strength"] == strength and out.settings["K"] == round(strength * 1000)
    assert out.settings["pivot_space"] == "pixel"
    # the base stage is what direct sampling at the base size gives
    np.testing.assert_array_equal(out.stages[0], sd(PROMPT, 32, 32, mode="direct", **STEPS3).images)


def test_hires_fix_default_strength_and_latent_pivot(sd):
    out = sd(PROMPT, 64, 64, mode="hires-fix", **FAST)
    assert out.settings["strength"] == 0.55 and out.settings["K"] == 550
    latent = sd(PROMPT, 64, 64, mode="hires-fix", pivot_space="latent", **FAST)
    assert latent.settings["pivot_space"] == "latent"
    assert np.abs(latent.images - out.images).max() > 1e-3


# -------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(mode="hires-fix", strength=0.0), r"strength must lie in \(0, 1\], got 0.0"),
        (dict(mode="hires-fix", strength=1.2), r"strength must lie in \(0, 1\], got 1.2"),
        (dict(mode="hires-fix", strength=True), r"strength must lie in \(0, 1\], got True"),
        (dict(mode="hires-fix", K=500), r"mode='hires-fix' takes strength="),
        (dict(mode="hires-fix", noise_level=0.5), r"mode='hires-fix' takes strength="),
        (dict(mode="direct", strength=0.5), r"strength only applies to mode='hires-fix', got mode='direct'"),
        (dict(mode="tuning-free", strength=0.5), r"strength only applies to mode='hires-fix'"),
        (dict(mode="redilate", upsamplers="bank"), r"upsamplers only apply to mode='tuned'"),
    ],
)
def test_bad_baseline_arguments_fail_before_sampling(sd, tiny_sd, kwargs, message):
    calls: list[int] = []
    handle = tiny_sd.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            sd(PROMPT, 64, 64, **{**FAST, **kwargs})
    finally:
        handle.remove()
    assert calls == []


def test_strength_to_k():
    assert strength_to_k(1, 1000) == 1000 and strength_to_k(0.55, 1000) == 550
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\], got -0.1"):
        strength_to_k(-0.1, 1000)
