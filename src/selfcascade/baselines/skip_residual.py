"""The progressive sampler DemoFusion and FreeScale share: the cascade's stages, plus a *skip residual* on every
step of the stages r >= 1 and an optional per-step noise predictor.

Skip residual (DemoFusion, Du et al. CVPR 2024, Sec. 3.2; FreeScale, Qiu et al. 2024, Sec. 3.1): before each
step at timestep t, the current latent is blended with the upsampled pivot diffused to t (one noise draw per
stage), weight c1 = ((1 + cos(pi (T - t) / T)) / 2) ** alpha, which is ~1 at t = T (the pivot's layout) and
falls to 0 at t = 0 (the model's own detail). Stage 0, the pivot upsampling, re-noising to the tail's first
timestep and the seeded noise are the cascade's own (``selfcascade.cascade``); only the step loop differs.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace
from typing import Callable, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..backbones.base import Backbone, PromptEmbeds
from ..cascade import (CascadeResult, PivotSpace, StageContext, StepCallback, _step_kwargs, _upsample_pivot, after_step,
                       renoise, sample_cascade, tail_timesteps)
from ..plan import ScalePlan

#: predict(latents, t, inputs, guidance, stage, step) -> guided noise prediction at a stage r >= 1.
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, dict, float, int, int], torch.Tensor]


def skip_residual_weight(t: float, num_train_timesteps: int, alpha: float) -> float:
    """c1 = ((1 + cos(pi (T - t) / T)) / 2) ** alpha."""
    return (0.5 * (1 + math.cos(math.pi * (num_train_timesteps - t) / num_train_timesteps))) ** alpha


@torch.no_grad()
def sample_with_skip_residuals(
    backbone: Backbone,
    plan: ScalePlan,
    embeds: PromptEmbeds,
    generators: Sequence[list[torch.Generator] | None],
    *,
    alpha: float,
    num_inference_steps: int = 50,
    k: int,
    guidance_scales: Sequence[float],
    pivot_space: PivotSpace = "latent",
    predict: NoisePredictor | None = None,
    stage_context: StageContext | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> CascadeResult:
    """Stage 0 as the cascade samples it; every later stage re-noised to K and denoised with skip residuals.

    ``predict`` replaces the plain guided UNet call at stages r >= 1 (DemoFusion's patch and dilated passes);
    ``stage_context`` wraps each stage r >= 1 as in ``sample_cascade``.
    """
    scheduler = backbone.scheduler
    num_train = scheduler.config.num_train_timesteps
    first = replace(plan, stages=plan.stages[:1])
    stage_latents = sample_cascade(backbone, first, embeds, generators[:1], num_inference_steps=num_inference_steps,
                                   k=k, guidance_scales=guidance_scales[:1], callback=callback,
                                   progress=progress).stage_latents
    batch = embeds.batch_size
    for r, (h, w) in enumerate(plan.stages[1:], start=1):
        guidance = guidance_scales[r]
        inputs = backbone.unet_inputs(embeds, h, w, do_cfg=guidance > 1.0)
        noise = randn_tensor(backbone.latent_shape(batch, h, w), generator=generators[r], device=backbone.device,
                             dtype=backbone.dtype)
        pivot = _upsample_pivot(backbone, stage_latents[-1], (h, w), pivot_space)
        timesteps = tail_timesteps(scheduler, num_inference_steps, k, backbone.device)
        latents = renoise(scheduler, pivot, noise, timesteps[:1])
        step_kwargs = _step_kwargs(scheduler, generators[r])
        context = nullcontext()
        if stage_context is not None:
            prev_inputs = backbone.unet_inputs(embeds, *plan.stages[r - 1], do_cfg=guidance > 1.0)
            context = stage_context(r, stage_latents[-1], prev_inputs, guidance)
        desc = f"stage {r + 1}/{plan.num_stages} {h}x{w}"
        with context:
            for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
                c1 = skip_residual_weight(float(t), num_train, alpha)
                latents = (1 - c1) * latents + c1 * renoise(scheduler, pivot, noise, t)
                if predict is None:
                    noise_pred = backbone.predict_noise(latents, t, inputs, guidance)
                else:
                    noise_pred = predict(latents, t, inputs, guidance, r, i)
                latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
                latents = after_step(callback, r, i, t, latents)
        stage_latents.append(latents)
    return CascadeResult(stage_latents)
