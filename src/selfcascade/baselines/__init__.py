"""Training-free baselines of the paper's Tables 1-2, as further modes of the same sampler.

- ``attn-sf``: direct inference with self-attention logits rescaled (Jin et al. 2023), ``attn_sf``;
- ``redilate``: direct inference with ScaleCrafter's re-dilated convolutions (He et al. 2023), ``redilation``;
- ``hires-fix``: base sample, pixel upscale, img2img at the target, ``hires_fix``;
- the rivals ``hidiffusion``, ``demofusion``, ``freescale``, ``deep-shrink``: ``rivals``.

The first two change the UNet only inside a context manager around the sampling, which restores it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

from torch import nn

from ..modes import BASELINE_MODES
from ..plan import ScalePlan
from .attn_sf import ScaledSelfAttnProcessor, scaled_self_attention
from .hires_fix import DEFAULT_STRENGTH, strength_to_k
from .redilation import REDILATE_ABOVE, UNDILATED_LEVELS, redilated, redilation_factor
from .rivals import RIVAL_MODES

__all__ = [
    "BASELINE_MODES", "DEFAULT_STRENGTH", "RIVAL_MODES", "REDILATE_ABOVE", "UNDILATED_LEVELS", "ScaledSelfAttnProcessor",
    "baseline_context", "redilated", "redilation_factor", "scaled_self_attention", "strength_to_k",
]


def baseline_context(mode: str, unet: nn.Module, plan: ScalePlan, num_train_timesteps: int) -> ContextManager:
    """What ``mode`` changes in the UNet while ``plan`` is sampled (nothing for the other modes)."""
    if mode == "attn-sf":
        return scaled_self_attention(unet, plan.ratio)
    if mode == "redilate":
        return redilated(unet, redilation_factor(plan.ratio), num_train_timesteps)
    return nullcontext()
