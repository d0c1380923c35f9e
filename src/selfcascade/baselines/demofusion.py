"""DemoFusion (Du et al., CVPR 2024, "DemoFusion: Democratising high-resolution image generation with no $$$",
arXiv 2311.16973): progressive upscaling, skip residuals, dilated sampling and local patch denoising.

- Progressive upscaling (Sec. 3.1): for a target s times the base side, stages at 1, 2, ..., s times the base
  side (``demofusion_plan``); each later stage upsamples the previous result in latent space and re-noises it
  fully (K = T, the whole schedule runs at every stage).
- Skip residual (Sec. 3.2): alpha = ``cosine_scale_1`` = 3 (``skip_residual``).
- Local patch denoising (Sec. 3.3, MultiDiffusion-style): the UNet denoises overlapping windows of the base
  latent size, stride half a window, and overlaps are averaged. The official code also jitters the windows
  randomly; here they are fixed, so a seed fully determines the image.
- Dilated sampling (Sec. 3.3): the s x s interleaved sub-latents ``z[i::s, j::s]`` (each of the base size) are
  denoised as global views, their input Gaussian-blurred (kernel 2s-1, sigma 0.8 c3, rescaled to the latent's
  mean and std; c3 = 0.99 cos_factor ** ``cosine_scale_3`` + 0.01, ``cosine_scale_3`` = 1); the two predictions
  are mixed as (1 - c2) local + c2 global, c2 = cos_factor ** ``cosine_scale_2``, ``cosine_scale_2`` = 1.
  The official code mixes the two stepped latents; for DDIM both step from the same latent, and the step is
  linear in the noise prediction, so mixing predictions is the same.
Settings are the paper's and its official pipeline's defaults (SDXL: window 128 latents, stride 64, sigma 0.8).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..backbones.base import Backbone, PromptEmbeds
from ..cascade import CascadeResult, PivotSpace, StageContext, StepCallback
from ..plan import ScalePlan
from ..window_attention import gaussian_blur, tile_starts
from .skip_residual import sample_with_skip_residuals

COSINE_SCALE_1 = 3.0  # skip residual exponent
COSINE_SCALE_2 = 1.0  # dilated (global) vs local weight exponent
COSINE_SCALE_3 = 1.0  # Gaussian blur strength exponent
SIGMA = 0.8  # Gaussian blur sigma at t = T
VIEW_BATCH_SIZE = 16  # windows per UNet call (the official default)


def demofusion_plan(base: tuple[int, int], height: int, width: int, multiple: int) -> ScalePlan:
    """Stages at 1, 2, ..., s times the base size; the target must be s times the base on both sides."""
    scale = height / base[0]
    if scale != width / base[1] or scale != int(scale) or scale < 1:
        raise ValueError(f"mode='demofusion' upscales by a whole factor on both sides: {height}x{width} is not "
                         f"s x the base {base[0]}x{base[1]} for an integer s; use e.g. "
                         f"{2 * base[0]}x{2 * base[1]} or {4 * base[0]}x{4 * base[1]}.")
    stages = tuple((base[0] * s, base[1] * s) for s in range(1, int(scale) + 1))
    for h, w in stages:
        if h % multiple or w % multiple:
            raise ValueError(f"DemoFusion stage {h}x{w} is not a multiple of {multiple} px, which this UNet needs.")
    return ScalePlan(tuple(base), (height, width), multiple, stages)


def _tile_inputs(value: Any, copies: int, do_cfg: bool) -> Any:
    """UNet inputs for a batch of ``copies`` views of every image (views outermost, CFG halves kept)."""
    if isinstance(value, dict):
        return {k: _tile_inputs(v, copies, do_cfg) for k, v in value.items()}
    if not isinstance(value, torch.Tensor):
        return value
    if do_cfg:
        negative, positive = value.chunk(2)
        return torch.cat([negative.repeat(copies, *[1] * (value.ndim - 1)),
                          positive.repeat(copies, *[1] * (value.ndim - 1))])
    return value.repeat(copies, *[1] * (value.ndim - 1))


def _predict_views(backbone: Backbone, views: list[torch.Tensor], t: torch.Tensor, inputs: dict,
                   guidance: float) -> list[torch.Tensor]:
    """Guided noise predictions for views of equal shape, ``VIEW_BATCH_SIZE`` views per UNet call."""
    out: list[torch.Tensor] = []
    batch = views[0].shape[0]
    for start in range(0, len(views), VIEW_BATCH_SIZE):
        chunk = views[start:start + VIEW_BATCH_SIZE]
        tiled = _tile_inputs(inputs, len(chunk), guidance > 1.0)
        pred = backbone.predict_noise(torch.cat(chunk), t, tiled, guidance)
        out.extend(pred.split(batch))
    return out


class DemoFusionPredictor:
    """The noise prediction of one DemoFusion step at a stage with side ``scale`` x the base size."""

    def __init__(self, backbone: Backbone, scales: Sequence[int], base_latent: tuple[int, int]) -> None:
        self.backbone, self.scales, self.base_latent = backbone, scales, base_latent
        self.windows_run = 0  # windows denoised so far (for tests and logs)

    def local(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, guidance: float) -> torch.Tensor:
        (th, tw), (h, w) = self.base_latent, latents.shape[-2:]
        boxes = [(top, left) for top in tile_starts(h, th) for left in tile_starts(w, tw)]
        preds = _predict_views(self.backbone, [latents[..., a:a + th, b:b + tw] for a, b in boxes], t, inputs,
                               guidance)
        total, count = torch.zeros_like(latents), torch.zeros_like(latents[:1, :1])
        for (a, b), pred in zip(boxes, preds):
            total[..., a:a + th, b:b + tw] += pred
            count[..., a:a + th, b:b + tw] += 1
        self.windows_run += len(boxes)
        self.coverage = count
        return total / count

    def dilated(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, guidance: float, scale: int,
                c3: float) -> torch.Tensor:
        blurred = gaussian_blur(latents, 2 * scale - 1, SIGMA * c3)
        blurred = (blurred - blurred.mean()) / blurred.std() * latents.std() + latents.mean()
        offsets = [(i, j) for i in range(scale) for j in range(scale)]
        preds = _predict_views(self.backbone, [blurred[..., i::scale, j::scale] for i, j in offsets], t, inputs,
                               guidance)
        out = torch.empty_like(latents)
        for (i, j), pred in zip(offsets, preds):
            out[..., i::scale, j::scale] = pred
        return out

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, guidance: float, stage: int,
                 step: int) -> torch.Tensor:
        num_train = self.backbone.scheduler.config.num_train_timesteps
        cos_factor = 0.5 * (1 + math.cos(math.pi * (num_train - float(t)) / num_train))
        c2 = cos_factor**COSINE_SCALE_2
        c3 = 0.99 * cos_factor**COSINE_SCALE_3 + 0.01
        local = self.local(latents, t, inputs, guidance)
        dilated = self.dilated(latents, t, inputs, guidance, self.scales[stage], c3)
        return (1 - c2) * local + c2 * dilated


def sample_demofusion(
    backbone: Backbone,
    plan: ScalePlan,
    embeds: PromptEmbeds,
    generators: Sequence[list[torch.Generator] | None],
    *,
    num_inference_steps: int = 50,
    guidance_scales: Sequence[float],
    pivot_space: PivotSpace = "latent",
    callback: StepCallback | None = None,
    progress: bool = True,
    stage_context: StageContext | None = None,
    predictor: DemoFusionPredictor | None = None,
    **_: Any,
) -> CascadeResult:
    """DemoFusion over ``plan`` (from ``demofusion_plan``); every stage r >= 1 runs the full schedule (K = T)."""
    base_latent = tuple(s // backbone.spatial_factor for s in plan.stages[0])
    scales = [h // plan.stages[0][0] for h, _ in plan.stages]
    predictor = predictor or DemoFusionPredictor(backbone, scales, base_latent)
    return sample_with_skip_residuals(
        backbone, plan, embeds, generators, alpha=COSINE_SCALE_1, num_inference_steps=num_inference_steps,
        k=backbone.scheduler.config.num_train_timesteps, guidance_scales=guidance_scales, pivot_space=pivot_space,
        predict=predictor, stage_context=stage_context, callback=callback, progress=progress,
    )
