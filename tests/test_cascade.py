"""The sampler itself (paper Algorithm 2): which timesteps each stage runs, and how pivots are re-noised.

Fast tests on the tiny offline pipelines (32 px base, 2-4 steps, targets of 64 or 128 px).
Stage r >= 1 must run exactly the scheduler's timesteps <= K, starting from
z = sqrt(abar_t) * bilinear_up(z0^{r-1}) + sqrt(1 - abar_t) * noise (Eq. 6) at the first of them.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

import selfcascade.cascade as cascade_mod
from selfcascade import SelfCascadePipeline
from selfcascade.cascade import DEFAULT_K, renoise, resolve_k, tail_timesteps
from selfcascade.pipeline import stage_seed

PROMPT = "a red apple"
CPU = torch.device("cpu")


def _schedule(scheduler_cls, config, steps: int, **overrides) -> list[int]:
    """The full inference schedule of a fresh scheduler built from ``config``."""
    s = scheduler_cls.from_config(config, **overrides)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def _record_timesteps(cascade: SelfCascadePipeline, height: int, width: int, **kwargs) -> dict[int, list[int]]:
    """Timesteps the UNet was run at, per stage, via the step callback."""
    seen: dict[int, list[int]] = {}

    def callback(stage, i, t, latents):
        assert i == len(seen.setdefault(stage, []))  # step indices count from 0 within each stage
        seen[stage].append(int(t))

    kwargs.setdefault("seed", 0)
    cascade(PROMPT, height, width, callback=callback, progress=False, output_type="latent", **kwargs)
    return seen


# ------------------------------------------------------------------------------ pure helpers
def test_resolve_k_defaults_fraction_and_integer():
    assert DEFAULT_K == 700
    assert resolve_k(1000) == 700
    assert resolve_k(1000, k=350) == 350
    assert resolve_k(1000, noise_level=0.4) == 400
    assert resolve_k(1000, noise_level=1.0) == 1000
    assert resolve_k(2000) == 1400  # the default scales with the training schedule's length


def test_tail_timesteps_is_the_schedule_filtered_by_k(tiny_sd):
    config = tiny_sd.scheduler.config
    full = _schedule(DDIMScheduler, config, 5)
    assert full == [801, 601, 401, 201, 1]
    scheduler = DDIMScheduler.from_config(config)
    for k in (1000, 801, 700, 601, 600, 200, 1):
        tail = tail_timesteps(scheduler, 5, k, CPU)
        assert [int(t) for t in tail] == [t for t in full if t <= k], k
        assert [int(t) for t in scheduler.timesteps] == full  # the scheduler keeps its full schedule


def test_tail_timesteps_positions_a_multistep_scheduler(tiny_sd):
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_sd.scheduler.config)
    tail = tail_timesteps(scheduler, 4, 500, CPU)
    assert [int(t) for t in tail] == [401, 201]
    assert scheduler.begin_index == 2  # add_noise and the first step() use the sigma of t=401
    with pytest.raises(ValueError, match=r"no timestep of the 4-step schedule is <= K=100 \(smallest: 201\)"):
        tail_timesteps(scheduler, 4, 100, CPU)


@pytest.mark.parametrize("t", [1, 334, 501, 700, 999])
def test_renoise_is_eq6(tiny_sd, t):
    scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    g = torch.Generator().manual_seed(t)
    pivot, noise = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    out = renoise(scheduler, pivot, noise, torch.tensor(t))
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(out, abar.sqrt() * pivot + (1 - abar).sqrt() * noise, rtol=1e-6, atol=1e-6)
    assert out.shape == pivot.shape


def test_renoise_is_eq6_for_a_sigma_scheduler(tiny_sd):
    """DPM-Solver parametrises by sigma; at the tail's first step its add_noise must still be Eq. 6."""
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_sd.scheduler.config)
    tail = tail_timesteps(scheduler, 4, DEFAULT_K, CPU)
    g = torch.Generator().manual_seed(0)
    pivot, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    out = renoise(scheduler, pivot, noise, tail[:1])
    abar = scheduler.alphas_cumprod[int(tail[0])]
    torch.testing.assert_close(out, abar.sqrt() * pivot + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ timesteps inside a real run
@pytest.mark.parametrize(
    "steps,kwargs,expected_tail",
    [
        (4, {}, [501, 251, 1]),  # default K=700: 751 is dropped
        (3, {"K": 500}, [334, 1]),
        (3, {"noise_level": 0.4}, [334, 1]),  # K = 400
        (2, {"K": 5}, [1]),  # DDIM "leading" always ends at t=1, so a tiny K still keeps one step
    ],
)
def test_later_stages_run_exactly_the_ddim_timesteps_below_k(tiny_sd, steps, kwargs, expected_tail):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    seen = _record_timesteps(cascade, 64, 64, num_inference_steps=steps, guidance_scale=1.0, **kwargs)
    full = _schedule(DDIMScheduler, tiny_sd.scheduler.config, steps)
    k = kwargs.get("K") or round(kwargs.get("noise_level", 0.7) * 1000)
    assert sorted(seen) == [0, 1]
    assert seen[0] == full
    assert seen[1] == [t for t in full if t <= k] == expected_tail


def test_multistep_scheduler_instance_runs_its_own_tail(tiny_sd):
    dpm = DPMSolverMultistepScheduler.from_config(tiny_sd.scheduler.config)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd, scheduler=dpm)
    assert cascade.backbone.scheduler is dpm
    assert tiny_sd.scheduler is not dpm and type(tiny_sd.scheduler) is DDIMScheduler
    seen = _record_timesteps(cascade, 64, 64, num_inference_steps=4, K=500)
    full = _schedule(DPMSolverMultistepScheduler, tiny_sd.scheduler.config, 4)
    assert seen[0] == full == [801, 601, 401, 201]
    assert seen[1] == [t for t in full if t <= 500] == [401, 201]


@pytest.mark.parametrize(
    "scheduler_factory,steps",
    [
        (lambda config: DDIMScheduler.from_config(config, timestep_spacing="trailing"), 2),  # [999, 499]
        (lambda config: DPMSolverMultistepScheduler.from_config(config), 2),  # [667, 334]
    ],
)
def test_too_few_steps_for_k_is_a_clear_error(tiny_sd, scheduler_factory, steps):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd, scheduler=scheduler_factory(tiny_sd.scheduler.config))
    with pytest.raises(ValueError, match=r"no timestep of the 2-step schedule is <= K=5.*raise K/noise_level or the number of steps"):
        cascade(PROMPT, 64, 64, num_inference_steps=steps, K=5, seed=0, guidance_scale=1.0, progress=False)


# ------------------------------------------------------------- the pivot inside a real run
class _RenoiseSpy:
    """Wraps ``selfcascade.cascade.renoise`` and keeps what went in and came out."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, scheduler, pivot, noise, timestep):
        out = renoise(scheduler, pivot, noise, timestep)
        self.calls.append(dict(pivot=pivot.clone(), noise=noise.clone(), t=timestep.clone(), out=out.clone(),
                               abar=scheduler.alphas_cumprod.clone()))
        return out


def _first_unet_inputs(unet):
    """Collect the ``sample`` the UNet gets at every call (a forward pre-hook; remove the handle after)."""
    samples: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        samples.append((args[0] if args else kwargs["sample"]).clone())

    return samples, unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_pivot_is_bilinear_upsample_of_previous_stage_renoised_by_eq6(tiny_sd, monkeypatch):
    spy = _RenoiseSpy()
    monkeypatch.setattr(cascade_mod, "renoise", spy)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    steps: list[tuple[int, int]] = []
    samples, handle = _first_unet_inputs(tiny_sd.unet)
    try:
        out = cascade(PROMPT, 128, 128, num_inference_steps=3, K=500, seed=3, return_stages=True,
                      output_type="latent", progress=False, callback=lambda r, i, t, z: steps.append((r, int(t))))
    finally:
        handle.remove()
    assert [tuple(z.shape) for z in out.stages] == [(1, 4, 16, 16), (1, 4, 32, 32), (1, 4, 64, 64)]
    assert steps == [(0, 667), (0, 334), (0, 1), (1, 334), (1, 1), (2, 334), (2, 1)]
    assert len(spy.calls) == 2  # stage 0 starts from pure noise, stages 1 and 2 from pivots

    first_call_of_stage = {r: i for i, (r, _) in reversed(list(enumerate(steps)))}
    for r, call in enumerate(spy.calls, start=1):
        previous = out.stages[r - 1]
        size = tuple(out.stages[r].shape[-2:])
        # pivot = bilinear upsample of the previous stage's final latents (latent space, paper Eq. 6's phi)
        expected_pivot = F.interpolate(previous, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(call["pivot"], expected_pivot, rtol=0, atol=0)
        # the noise is the stage's own per-image stream
        expected_noise = torch.randn((1, 4, *size), generator=torch.Generator().manual_seed(stage_seed(3, r)))
        torch.testing.assert_close(call["noise"], expected_noise, rtol=0, atol=0)
        # diffused to the first timestep <= K, by Eq. 6
        assert int(call["t"]) == 334
        abar = call["abar"][334]
        torch.testing.assert_close(call["out"], abar.sqrt() * expected_pivot + (1 - abar).sqrt() * expected_noise,
                                   rtol=1e-6, atol=1e-6)
        # and that re-noised pivot is exactly what the UNet denoises first at this stage (CFG batch of 2)
        first = samples[first_call_of_stage[r]]
        assert first.shape == (2, 4, *size)
        torch.testing.assert_close(first[0:1], call["out"], rtol=0, atol=0)
        torch.testing.assert_close(first[1:2], call["out"], rtol=0, atol=0)


def test_pixel_space_pivot_is_decode_resize_encode(tiny_sd, monkeypatch):
    spy = _RenoiseSpy()
    monkeypatch.setattr(cascade_mod, "renoise", spy)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    kwargs = dict(num_inference_steps=2, seed=1, return_stages=True, output_type="latent", progress=False)
    pixel = cascade(PROMPT, 64, 64, pivot_space="pixel", **kwargs)
    assert len(spy.calls) == 1
    expected = cascade.backbone.resize_in_pixels(pixel.stages[0], 64, 64)
    torch.testing.assert_close(spy.calls[0]["pivot"], expected, rtol=1e-5, atol=1e-5)
    bilinear = F.interpolate(pixel.stages[0], size=(32, 32), mode="bilinear", align_corners=False)
    assert not torch.allclose(spy.calls[0]["pivot"], bilinear, atol=1e-3)

    latent = cascade(PROMPT, 64, 64, pivot_space="latent", **kwargs)
    torch.testing.assert_close(latent.stages[0], pixel.stages[0], rtol=0, atol=0)  # stage 0 does not depend on it
    assert latent.stages[1].shape == pixel.stages[1].shape
    assert not torch.allclose(latent.stages[1], pixel.stages[1], atol=1e-3)
    assert latent.settings["pivot_space"] == "latent" and pixel.settings["pivot_space"] == "pixel"


# ----------------------------------------------------------------- other diffusers schedulers
@pytest.mark.parametrize(
    "scheduler_name",
    [
        "EulerDiscreteScheduler",  # SDXL's default: sigma-scaled init noise, scale_model_input
        "DDPMScheduler",
        # The next ones' step() takes no `generator` argument; the cascade must not pass one
        # (diffusers' pipelines check the signature in prepare_extra_step_kwargs).
        "UniPCMultistepScheduler",
        "DEISMultistepScheduler",
        "HeunDiscreteScheduler",  # second order: every timestep but the first appears twice
    ],
)
def test_any_add_noise_scheduler_runs_its_tail(tiny_sd, scheduler_name):
    import diffusers

    scheduler_cls = getattr(diffusers, scheduler_name)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd, scheduler=scheduler_cls.from_config(tiny_sd.scheduler.config))
    seen = _record_timesteps(cascade, 64, 64, num_inference_steps=3, guidance_scale=1.0, K=600)
    full = _schedule(scheduler_cls, tiny_sd.scheduler.config, 3)
    assert seen[0] == full
    assert seen[1] == [t for t in full if t <= 600]
    assert 0 < len(seen[1]) < len(full)


def test_pndm_cannot_start_mid_schedule_and_says_so(tiny_sd):
    """PNDM (SD 1.x's shipped scheduler) keeps its place in ``step()`` with a counter and a duplicated
    warm-up timestep, so it cannot begin at the first timestep <= K: it must be refused with a clear
    error naming the fix, not silently run the wrong updates."""
    from diffusers import PNDMScheduler

    pndm = PNDMScheduler.from_config(tiny_sd.scheduler.config, skip_prk_steps=True)
    with pytest.raises(ValueError, match="PNDMScheduler") as info:
        SelfCascadePipeline.from_pipe(tiny_sd, scheduler=pndm)
    assert "ddim" in str(info.value).lower()


def test_clipping_ddim_rederives_eps_from_the_clipped_x0() -> None:
    from diffusers import EulerDiscreteScheduler

    from selfcascade.cascade import _step_kwargs

    g = [torch.Generator()]
    assert _step_kwargs(DDIMScheduler(clip_sample=True), g) == {"generator": g, "use_clipped_model_output": True}
    assert _step_kwargs(DDIMScheduler(clip_sample=False), g) == {"generator": g}
    assert _step_kwargs(EulerDiscreteScheduler(), g) == {"generator": g}


def test_every_stage_draws_different_noise_on_cpu() -> None:
    """torch's CPU generator keeps only a seed's low 32 bits: stage offsets must change them."""
    draws = [torch.randn(8, generator=torch.Generator().manual_seed(stage_seed(3, r))) for r in range(4)]
    assert stage_seed(3, 0) == 3
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i + 1, 4))


def test_default_k_keeps_the_papers_signal_level_on_other_schedules() -> None:
    from diffusers import DDPMScheduler

    from selfcascade.schedule import matched_k

    sd = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    linear = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    assert matched_k(sd.alphas_cumprod) == 700
    k = matched_k(linear.alphas_cumprod)
    assert k == 494
    assert abs(linear.alphas_cumprod[k].sqrt() - sd.alphas_cumprod[700].sqrt()) < 0.005
    assert resolve_k(1000, default=k) == 494 and resolve_k(1000, k=300, default=k) == 300


def test_a_model_card_k_overrides_the_signal_level_default() -> None:
    from diffusers import DDPMScheduler

    from selfcascade.backbones.embedded import EmbeddedBackbone
    from selfcascade.train_base import build_unet

    scheduler = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    unet = build_unet({"sample_size": 8, "block_out_channels": [16, 32], "norm_num_groups": 8,
                       "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                       "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 8})
    assert EmbeddedBackbone(unet, scheduler, text_encoder=None).default_k == 494
    assert EmbeddedBackbone(unet, scheduler, text_encoder=None, sampling_k=300).default_k == 300
