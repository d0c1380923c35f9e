"""The rivals (hidiffusion, demofusion, freescale, deep-shrink) and the cascade's window_attention option, on the
tiny random-weight pipelines of ``selfcascade.testing``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfcascade import SelfCascadePipeline, cli
from selfcascade.baselines import RIVAL_MODES
from selfcascade.baselines.demofusion import DemoFusionPredictor, demofusion_plan, sample_demofusion
from selfcascade.baselines.freescale import restrained_convs
from selfcascade.baselines.hidiffusion import is_patched
from selfcascade.testing import make_tiny_sd15
from selfcascade.window_attention import ScaleFusionProcessor, ShiftedWindowProcessor, windowed_self_attention

PROMPT = "a red apple"
FAST = dict(num_inference_steps=4, seed=0, output_type="np", progress=False)


@pytest.fixture(scope="module")
def tiny_sd15():
    """SD 1.5's UNet layout at tiny widths (what hidiffusion recognises). Read-only."""
    return make_tiny_sd15(seed=0)


def _snapshot(unet: torch.nn.Module) -> dict:
    """Everything a mode may touch: module classes and attributes, processors, hooks, conv geometry, weights."""
    modules = {
        name: (type(m), frozenset(vars(m)), getattr(m, "processor", None), len(m._forward_pre_hooks),
               len(m._forward_hooks), getattr(m, "dilation", None), getattr(m, "padding", None))
        for name, m in unet.named_modules()
    }
    weights = float(sum(p.detach().double().sum() for p in unet.parameters()))
    return {"modules": modules, "num_upsamplers": unet.num_upsamplers, "weights": weights}



@pytest.mark.parametrize("mode", RIVAL_MODES)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_rival_runs_is_seeded_and_leaves_the_unet_as_it_was(mode, family, request):
    if mode == "hidiffusion" and family == "sdxl":
        pytest.skip("hidiffusion recognises SDXL only by the full SDXL module layout; the tiny SDXL has two levels")
    pipe = request.getfixturevalue("tiny_sd15" if mode == "hidiffusion" else f"tiny_{family}")
    before = _snapshot(pipe.unet)
    cascade = SelfCascadePipeline.from_pipe(pipe)
    first = cascade(PROMPT, 64, 64, mode=mode, **FAST)
    second = cascade(PROMPT, 64, 64, mode=mode, **FAST)
    assert first.images.shape == (1, 64, 64, 3)
    assert np.isfinite(first.images).all() and first.images.std() > 0.01
    np.testing.assert_array_equal(first.images, second.images)
    assert first.settings["mode"] == mode
    assert _snapshot(pipe.unet) == before


@pytest.mark.parametrize("mode", RIVAL_MODES)
def test_rival_differs_from_direct_and_the_cascade(mode, tiny_sd, tiny_sd15):
    pipe = tiny_sd15 if mode == "hidiffusion" else tiny_sd
    cascade = SelfCascadePipeline.from_pipe(pipe)
    out = cascade(PROMPT, 64, 64, mode=mode, **FAST).images
    for other in ("direct", "tuning-free"):
        assert np.abs(out - cascade(PROMPT, 64, 64, mode=other, **FAST).images).max() > 1e-3, other


def test_cli_offers_the_rivals_and_window_attention():
    parser = cli.build_parser()
    for mode in RIVAL_MODES:
        assert parser.parse_args(["generate", PROMPT, "--mode", mode]).mode == mode
    assert parser.parse_args(["generate", PROMPT, "--window-attention"]).window_attention is True
    assert parser.parse_args(["generate", PROMPT]).window_attention is False


# ------------------------------------------------------------------------------------------------ deep shrink
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_deep_shrink_halves_the_deep_levels_only_in_early_steps(family, request):
    unet = request.getfixturevalue(f"tiny_{family}").unet
    seen: list[tuple[float, tuple, tuple]] = []
    current = {}

    def top(module, args, kwargs):
        current["top"] = tuple(kwargs["hidden_states"].shape[-2:])

    def deep(module, args):
        seen.append((current["t"], current["top"], tuple(args[0].shape[-2:])))

    handles = [unet.down_blocks[0].register_forward_pre_hook(top, with_kwargs=True),
               unet.down_blocks[1].resnets[0].register_forward_pre_hook(deep)]  # inside the block: after the shrink
    handles.append(unet.register_forward_pre_hook(lambda m, a, k: current.update(t=float(a[1])), with_kwargs=True))
    try:
        SelfCascadePipeline.from_pipe(request.getfixturevalue(f"tiny_{family}"))(
            PROMPT, 64, 64, mode="deep-shrink", num_inference_steps=10, seed=0, output_type="np", progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 10
    for t, top_size, deep_size in seen:
        assert top_size == (32, 32)  # the first level always runs at full size
        assert deep_size == ((8, 8) if t > 650 else (16, 16)), t
    assert sum(t > 650 for t, *_ in seen) == 3  # 901, 801, 701 of the 10-step schedule


# ------------------------------------------------------------------------------------------------- demofusion
def test_demofusion_plan_grows_by_one_base_side_per_stage():
    assert demofusion_plan((32, 32), 128, 128, 4).stages == ((32, 32), (64, 64), (96, 96), (128, 128))
    with pytest.raises(ValueError, match="whole factor"):
        demofusion_plan((32, 32), 96, 64, 4)


def test_demofusion_patches_cover_the_canvas_and_dilated_views_have_the_base_size(tiny_sd):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    bb = cascade.backbone
    plan = cascade.plan(96, 96, "demofusion")
    predictor = DemoFusionPredictor(bb, [1, 2, 3], (16, 16))
    view_sizes = set()
    hook = bb.unet.register_forward_pre_hook(lambda m, a: view_sizes.add(tuple(a[0].shape[-2:])))
    embeds = bb.encode_prompt([PROMPT], None, 1, do_cfg=True)
    generators = [[torch.Generator().manual_seed(r)] for r in range(plan.num_stages)]
    try:
        sample_demofusion(bb, plan, embeds, generators, num_inference_steps=2, guidance_scales=[7.5] * 3,
                          progress=False, predictor=predictor)
    finally:
        hook.remove()
    assert (predictor.coverage > 0).all()  # every latent cell of the last stage (48x48) got a window
    assert predictor.coverage.shape[-2:] == (48, 48)
    assert predictor.windows_run == 2 * (3 * 3) + 2 * (5 * 5)  # windows of 16, stride 8 on 32x32 and 48x48
    assert view_sizes == {(16, 16)}  # every UNet call (patches, dilated views, stage 0) at the base latent size


def test_demofusion_takes_no_k(tiny_sd):
    with pytest.raises(ValueError, match="K = T"):
        SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, mode="demofusion", K=500, **FAST)


# ------------------------------------------------------------------------------------------------ hidiffusion
def test_hidiffusion_is_applied_during_the_call_only(tiny_sd15):
    patched = []
    cascade = SelfCascadePipeline.from_pipe(tiny_sd15)
    cascade(PROMPT, 64, 64, mode="hidiffusion", callback=lambda *a: patched.append(is_patched(tiny_sd15.unet)),
            **FAST)
    assert patched == [True] * 4 and not is_patched(tiny_sd15.unet)
    assert not hasattr(tiny_sd15, "info") and not hasattr(tiny_sd15, "_num_timesteps")


def test_hidiffusion_refuses_a_unet_it_does_not_know(tiny_sd):
    with pytest.raises(ValueError, match="module names"):
        SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, mode="hidiffusion", **FAST)
    assert not is_patched(tiny_sd.unet)


# -------------------------------------------------------------------------------------------------- freescale
def test_freescale_dilates_and_fuses_in_later_stages_only(tiny_sd):
    unet = tiny_sd.unet
    convs = restrained_convs(unet)
    assert convs and all(c.dilation == (1, 1) for c in convs)
    seen = []

    def record(module, args, kwargs, output):
        fused = all(isinstance(m.processor, ScaleFusionProcessor) for m in unet.modules()
                    if hasattr(m, "set_processor") and not m.is_cross_attention)
        seen.append((float(args[1]), tuple(args[0].shape[-2:]), convs[0].dilation, fused))

    hook = unet.register_forward_hook(record, with_kwargs=True)  # after the pre-hooks that set the dilation
    try:
        SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, mode="freescale", num_inference_steps=10, seed=0,
                                               output_type="np", progress=False)
    finally:
        hook.remove()
    base = [s for s in seen if s[1] == (16, 16)]
    later = [s for s in seen if s[1] == (32, 32)]
    assert len(base) == 10 and all(d == (1, 1) and not fused for _, _, d, fused in base)
    assert later and all(fused for *_, fused in later)
    assert all(d == ((2, 2) if t > 300 else (1, 1)) for t, _, d, _ in later)


# --------------------------------------------------------------------------------------- window attention
def test_shifted_windows_attend_within_quadrants(tiny_sd_fresh):
    unet = tiny_sd_fresh.unet
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    inner = attn.processor
    x = torch.randn(2, 16 * 16, attn.to_q.in_features)
    with windowed_self_attention(unet) as processors:
        processor = next(p for p in processors if p.inner is inner)
        processors[0].tracker.size = (16, 16)  # as the UNet's pre-hook records it for a 16x16 latent
        out = processor(attn, x)
        shifted = processor(attn, x)
    grid = x.view(2, 16, 16, -1)
    for a in (0, 8):
        for b in (0, 8):
            quadrant = grid[:, a:a + 8, b:b + 8].reshape(2, 64, -1)
            expected = inner(attn, quadrant).view(2, 8, 8, -1)
            torch.testing.assert_close(out.view(2, 16, 16, -1)[:, a:a + 8, b:b + 8], expected)
    assert not torch.allclose(out, shifted)  # every other call shifts the windows
    assert not torch.allclose(out, inner(attn, x))
    assert isinstance(processor, ShiftedWindowProcessor) and attn.processor is inner


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_window_attention_windows_the_final_stage_only(family, request):
    pipe = request.getfixturevalue(f"tiny_{family}")
    before = _snapshot(pipe.unet)
    cascade = SelfCascadePipeline.from_pipe(pipe)
    windowed = []

    def callback(stage, i, t, latents):
        windowed.append((stage, any(isinstance(getattr(m, "processor", None), ShiftedWindowProcessor)
                                    for m in pipe.unet.modules())))

    out = cascade(PROMPT, 128, 128, mode="tuning-free", window_attention=True, callback=callback, **FAST)
    plain = cascade(PROMPT, 128, 128, mode="tuning-free", **FAST)
    assert out.images.shape == (1, 128, 128, 3) and out.settings["window_attention"] is True
    assert {s for s, w in windowed if w} == {2} and {s for s, w in windowed if not w} == {0, 1}
    assert np.abs(out.images - plain.images).max() > 1e-3
    np.testing.assert_array_equal(out.images, cascade(PROMPT, 128, 128, window_attention=True, **FAST).images)
    assert _snapshot(pipe.unet) == before


def test_window_attention_needs_a_cascade(tiny_sd):
    with pytest.raises(ValueError, match="final stage of a cascade"):
        SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, mode="direct", window_attention=True, **FAST)
