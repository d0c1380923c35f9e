"""The self-cascade sampler (paper Algorithm 2): stage 0 from noise, later stages from re-noised pivots.

No I/O, no prompt handling: it takes a backbone, a scale plan and text embeddings and returns the
latents of every stage. Direct inference is the same function with a one-stage plan.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Sequence

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .backbones.base import Backbone, PivotSpace, PromptEmbeds
from .plan import ScalePlan
from .schedule import DEFAULT_K

#: callback(stage, step_index, timestep, latents) after every denoising step; latents it returns replace the
#: sampler's (diffusers' ``callback_on_step_end`` contract), None keeps them.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
#: stage_context(stage, prev_latents, unet_inputs_at_prev_size, guidance) -> a context manager around
#: the denoising of stage r >= 1 (the tuned cascade attaches its feature upsamplers through it).
StageContext = Callable[[int, torch.Tensor, dict, float], ContextManager]


@dataclass
class CascadeResult:
    """Final latents of every stage, base first."""

    stage_latents: list[torch.Tensor]


def resolve_k(num_train_timesteps: int, k: int | None = None, noise_level: float | None = None,
              default: int | None = None) -> int:
    """K from either an integer step or a fraction of the training schedule (``noise_level``).

    Without either: ``default`` (the backbone's own, see :func:`matched_k`), else the paper's 700 of 1000.
    """
    if k is not None and noise_level is not None:
        raise ValueError("give either K or noise_level, not both (noise_level is K / num_train_timesteps).")
    if noise_level is not None:
        if not 0.0 < noise_level <= 1.0:
            raise ValueError(f"noise_level must lie in (0, 1], got {noise_level}.")
        k = round(noise_level * num_train_timesteps)
    if k is None:
        k = default if default is not None else round(DEFAULT_K * num_train_timesteps / 1000)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= num_train_timesteps:
        raise ValueError(f"K must be an integer in [1, {num_train_timesteps}], got {k!r}.")
    return k


def tail_timesteps(scheduler, num_inference_steps: int, k: int, device: torch.device) -> torch.Tensor:
    """The scheduler's timesteps that are <= K, with the scheduler positioned at the first of them.

    The pivot is diffused to that first timestep (not to K itself) so that the noise level of the
    re-noised latent is exactly the one the solver's first step expects.
    """
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps
    keep = (timesteps <= k).nonzero()
    if len(keep) == 0:
        raise ValueError(
            f"no timestep of the {num_inference_steps}-step schedule is <= K={k} (smallest: {int(timesteps.min())}); "
            "raise K/noise_level or the number of steps."
        )
    begin = int(keep[0])
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return timesteps[begin:]


def renoise(scheduler, pivot: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Eq. 6: z_K = sqrt(abar_K) * pivot + sqrt(1 - abar_K) * noise, in the scheduler's own convention."""
    return scheduler.add_noise(pivot, noise, timestep.reshape(1).repeat(pivot.shape[0]))


def _step_kwargs(scheduler, generator: list[torch.Generator] | None) -> dict:
    """Extra ``scheduler.step`` arguments that the scheduler accepts."""
    accepted = inspect.signature(scheduler.step).parameters
    # Deterministic solvers (UniPC, DEIS, Heun, LMS...) take no generator; stochastic ones need it for seeds.
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if "use_clipped_model_output" in accepted and scheduler.config.get("clip_sample", False):
        # With x0 clipping (pixel-space models), DDIM must re-derive eps from the clipped x0, as guided
        # diffusion's DDIM does; diffusers' default mixes a clipped x0 with the unclipped eps and diverges.
        kwargs["use_clipped_model_output"] = True
    return kwargs


def after_step(callback: StepCallback | None, stage: int, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """Run ``callback`` after a step; the latents it returns, if any, are the ones sampling goes on from."""
    out = None if callback is None else callback(stage, i, t, latents)
    return latents if out is None else out


def denoise(
    backbone: Backbone,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    inputs: dict,
    guidance_scale: float,
    generator: list[torch.Generator] | None,
    stage: int = 0,
    callback: StepCallback | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> torch.Tensor:
    """Run the scheduler over ``timesteps`` from ``latents``."""
    scheduler = backbone.scheduler
    step_kwargs = _step_kwargs(scheduler, generator)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        noise_pred = backbone.predict_noise(latents, t, inputs, guidance_scale)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]
        latents = after_step(callback, stage, i, t, latents)
    return latents


def _upsample_pivot(backbone: Backbone, latents: torch.Tensor, size: tuple[int, int], space: PivotSpace) -> torch.Tensor:
    h, w = size
    if space == "latent":
        return backbone.resize_latents(latents, h, w)
    with backbone.decode_context(h, w, latents.shape[0]):
        return backbone.resize_in_pixels(latents, h, w)


@torch.no_grad()
def sample_cascade(
    backbone: Backbone,
    plan: ScalePlan,
    embeds: PromptEmbeds,
    generators: Sequence[list[torch.Generator] | None],
    num_inference_steps: int = 50,
    k: int = DEFAULT_K,
    guidance_scales: Sequence[float] = (7.5,),
    pivot_space: PivotSpace = "latent",
    callback: StepCallback | None = None,
    progress: bool = True,
    stage_context: StageContext | None = None,
    num_frames: int | None = None,
    start_latents: torch.Tensor | None = None,
    unet_kwargs: dict | None = None,
) -> CascadeResult:
    """Sample every stage of ``plan``; ``generators[r]`` holds one generator per image for stage r (or one for the
    batch).

    ``unet_kwargs`` go to every UNet call (e.g. ``cross_attention_kwargs``).

    ``start_latents`` (e.g. an existing image or clip, encoded) stand in for stage 0, which is then
    not sampled: the cascade only upscales them.

    ``num_frames`` (video backbones only) stays fixed across stages: the plan scales height and width.

    ``stage_context`` wraps each stage r >= 1; it gets the previous stage's final latents and the UNet
    inputs at the previous size (same prompt and CFG layout as stage r), e.g. for a pivot feature pass.
    """
    scheduler = backbone.scheduler
    device, dtype = backbone.device, backbone.dtype
    batch = embeds.batch_size
    stage_latents: list[torch.Tensor] = []
    for r, (h, w) in enumerate(plan.stages):
        guidance = guidance_scales[r]
        inputs = {**backbone.unet_inputs(embeds, h, w, do_cfg=guidance > 1.0), **(unet_kwargs or {})}
        shape = backbone.latent_shape(batch, h, w, num_frames)
        noise = randn_tensor(shape, generator=generators[r], device=device, dtype=dtype)
        if r == 0 and start_latents is not None:
            if tuple(start_latents.shape) != tuple(shape):
                raise ValueError(f"start latents of shape {tuple(start_latents.shape)} do not fit stage 0, which "
                                 f"needs {tuple(shape)} ({h}x{w} px).")
            stage_latents.append(start_latents.to(device, dtype))
            continue
        if r == 0:
            scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = scheduler.timesteps
            latents = noise * scheduler.init_noise_sigma
        else:
            pivot = _upsample_pivot(backbone, stage_latents[-1], (h, w), pivot_space)
            timesteps = tail_timesteps(scheduler, num_inference_steps, k, device)
            latents = renoise(scheduler, pivot, noise, timesteps[:1])
        desc = f"stage {r + 1}/{plan.num_stages} {h}x{w}"
        context = nullcontext()
        if r > 0 and stage_context is not None:
            prev_inputs = {**backbone.unet_inputs(embeds, *plan.stages[r - 1], do_cfg=guidance > 1.0),
                           **(unet_kwargs or {})}
            context = stage_context(r, stage_latents[-1], prev_inputs, guidance)
        with context:
            latents = denoise(backbone, latents, timesteps, inputs, guidance, generators[r], r, callback, progress, desc)
        stage_latents.append(latents)
    return CascadeResult(stage_latents)
