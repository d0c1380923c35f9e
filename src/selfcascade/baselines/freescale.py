"""FreeScale (Qiu et al., arXiv 2412.09626, "FreeScale: Unleashing the resolution of diffusion models via
tuning-free scale fusion"): tailored self-cascade upscaling, restrained dilation and scale fusion.

Settings are those of the paper's SDXL runs and its official code (``run_freescale.py``, ``pipeline_freescale.py``):
- Self-cascade upscaling (Sec. 3.1): the cascade's own plan (2x side per stage: 1024 -> 2048 -> 4096 on SDXL);
  each pivot is decoded, upsampled bicubically in pixel space and encoded (``pivot_space="pixel"``), re-noised to
  the restart step (15 of 50 steps, t = 681 on SD's schedule: the cascade's K = 700 selects the same step), and
  denoised with skip residuals of exponent ``cosine_scale`` = 2.0.
- Restrained dilation (Sec. 3.2): only the lowest-resolution level's convolutions are dilated (the official
  list on SDXL: the downsampler into the deepest level, that level's resnets and the mid block's), by the stage's
  side ratio to the base size, for the first ``dilate_tau`` = 35 of 50 steps (the official app's default).
- Scale fusion (Sec. 3.3): every self-attention layer fuses global and local (tiled) attention,
  ``selfcascade.window_attention.scale_fused_self_attention``.
Not included: FreeU (the official script enables it by default; it is a separate method, off here for every
mode) and the tiles' random jitter (fixed tiles keep a seed's image reproducible).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..backbones.base import Backbone, PromptEmbeds
from ..cascade import CascadeResult, PivotSpace, StageContext, StepCallback
from ..plan import ScalePlan
from ..window_attention import scale_fused_self_attention
from .redilation import _timestep, redilation_factor
from .skip_residual import sample_with_skip_residuals

COSINE_SCALE = 2.0
#: Dilate while t is above this fraction of T: the first 35 of 50 leading-spaced steps (t > ~281 of 1000).
DILATE_ABOVE = 0.3
PIVOT_SPACE: PivotSpace = "pixel"


def restrained_convs(unet: nn.Module) -> list[nn.Conv2d]:
    """The 3x3 convolutions FreeScale dilates: the downsampler into the deepest level, its resnets, the mid block's."""
    into_deepest = getattr(unet.down_blocks[-2], "downsamplers", None) or []
    blocks = [*into_deepest, *unet.down_blocks[-1].resnets, *unet.mid_block.resnets]
    return [m for block in blocks for m in block.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.dilation == (1, 1) and m.padding == (1, 1)]


@contextmanager
def restrained_dilation(unet: nn.Module, dilation: int, num_train_timesteps: int,
                        above: float = DILATE_ABOVE) -> Iterator[list[nn.Conv2d]]:
    """Dilate ``restrained_convs`` by ``dilation`` while t > ``above`` * T; all restored on exit."""
    convs = restrained_convs(unet)
    threshold = above * num_train_timesteps

    def switch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        d = dilation if _timestep(args, kwargs) > threshold else 1
        for conv in convs:
            conv.dilation, conv.padding = (d, d), (d, d)

    handle = unet.register_forward_pre_hook(switch, with_kwargs=True)
    try:
        yield convs
    finally:
        handle.remove()
        for conv in convs:
            conv.dilation, conv.padding = (1, 1), (1, 1)


def freescale_stage_context(backbone: Backbone, plan: ScalePlan) -> StageContext:
    """Restrained dilation (by the stage's side ratio) and scale fusion around each stage r >= 1."""
    base_latent = tuple(s // backbone.spatial_factor for s in plan.base)
    num_train = backbone.scheduler.config.num_train_timesteps

    @contextmanager
    def context(stage: int, prev_latents: torch.Tensor, prev_inputs: dict, guidance: float) -> Iterator[None]:
        h, w = plan.stages[stage]
        ratio = h * w / (plan.base[0] * plan.base[1])
        with ExitStack() as stack:
            stack.enter_context(restrained_dilation(backbone.unet, redilation_factor(ratio), num_train))
            stack.enter_context(scale_fused_self_attention(backbone.unet, base_latent))
            yield

    return context


def sample_freescale(
    backbone: Backbone,
    plan: ScalePlan,
    embeds: PromptEmbeds,
    generators: Sequence[list[torch.Generator] | None],
    *,
    num_inference_steps: int = 50,
    k: int,
    guidance_scales: Sequence[float],
    pivot_space: PivotSpace = PIVOT_SPACE,
    callback: StepCallback | None = None,
    progress: bool = True,
    **_: Any,
) -> CascadeResult:
    """FreeScale over the cascade's ``plan``: pivots (pixel space by default) re-noised to ``k``, skip residuals,
    restrained dilation and scale fusion."""
    return sample_with_skip_residuals(
        backbone, plan, embeds, generators, alpha=COSINE_SCALE, num_inference_steps=num_inference_steps, k=k,
        guidance_scales=guidance_scales, pivot_space=pivot_space,
        stage_context=freescale_stage_context(backbone, plan), callback=callback, progress=progress,
    )
