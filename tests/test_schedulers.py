"""The schedulers users know by name start every later stage at the noise level of K, keep the model's settings,
and the ones that cannot run the cascade are refused with the names of those that can."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler

from selfcascade import SelfCascadePipeline
from selfcascade.cascade import renoise, tail_timesteps
from selfcascade.schedulers import SCHEDULERS, make_scheduler, scheduler_key

CPU = torch.device("cpu")
K = 700


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_tail_starts_at_the_noise_level_of_k(tiny_sd, name):
    scheduler = make_scheduler(name, tiny_sd.scheduler)
    scheduler.set_timesteps(20, device=CPU)
    full = [float(t) for t in scheduler.timesteps]
    tail = tail_timesteps(scheduler, 20, K, CPU)
    first = float(tail[0])
    assert first <= K and max(t for t in full if t <= K) == first  # the first step of the schedule at or below K
    # The re-noised pivot's noise-to-signal ratio is the one this timestep has on the training schedule.
    signal = renoise(scheduler, torch.ones(1, 1), torch.zeros(1, 1), tail[:1])
    noise = renoise(scheduler, torch.zeros(1, 1), torch.ones(1, 1), tail[:1])
    abar = tiny_sd.scheduler.alphas_cumprod[round(first)]
    expected = ((1 - abar) / abar).sqrt()
    assert float(noise / signal) == pytest.approx(float(expected), rel=0.03)
    abar_k = tiny_sd.scheduler.alphas_cumprod[K]
    sigma_k = float(((1 - abar_k) / abar_k).sqrt())  # 3.3 at K=700, far below a full schedule's sigma_max of 14.6
    assert 0.7 * sigma_k < float(noise / signal) <= 1.03 * sigma_k


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_named_scheduler_runs_the_cascade(tiny_sd, name):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd, scheduler=name)
    out = cascade("a red apple", 64, 64, seed=0, num_inference_steps=3, output_type="pt", progress=False)
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    assert out.settings["scheduler"] == SCHEDULERS[name][0]


def test_a1111_spellings_name_the_same_schedulers():
    assert scheduler_key("DPM++ 2M Karras") == "dpm++-2m-karras"
    assert scheduler_key("Euler a") == "euler-a"
    assert scheduler_key("UniPC") == "unipc" and scheduler_key("DDIM") == "ddim"
    karras = make_scheduler("DPM++ 2M Karras", DDIMScheduler(clip_sample=False))
    assert type(karras).__name__ == "DPMSolverMultistepScheduler" and karras.config.use_karras_sigmas
    assert karras.config.algorithm_type == "dpmsolver++" and karras.config.solver_order == 2


def test_conversion_keeps_the_models_settings(tiny_sd_v):
    euler = make_scheduler("euler", tiny_sd_v.scheduler)
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "timestep_spacing", "steps_offset"):
        assert euler.config[key] == tiny_sd_v.scheduler.config[key]
    assert euler.config.prediction_type == "v_prediction"


def test_ddim_from_a_config_without_clip_sample_does_not_clip_latents():
    """SDXL's Euler config may lack clip_sample; DDIM's own default (True) would clip latents to [-1, 1]."""
    source = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config = {k: v for k, v in source.config.items() if k != "clip_sample"}
    source._internal_dict = type(source.config)(config)
    assert "clip_sample" not in source.config
    assert make_scheduler("ddim", source).config.clip_sample is False
    assert make_scheduler("ddim", DDIMScheduler(clip_sample=True)).config.clip_sample is True  # kept when set


def test_edm_schedulers_are_refused_with_what_works(tiny_sd):
    with pytest.raises(ValueError, match=r"EDMEulerScheduler counts its timesteps in other units.*ddim, euler, euler-a"):
        SelfCascadePipeline.from_pipe(tiny_sd, scheduler=EDMEulerScheduler())
