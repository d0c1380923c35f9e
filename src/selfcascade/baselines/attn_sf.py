"""Attn-SF (Jin et al. 2023, "Training-free diffusion model adaptation for variable-sized text-to-image
synthesis", arXiv 2306.08645): keep the entropy of self-attention at a new size as it was in training.

A layer that attended over N_train tokens in training sees N tokens at another size; its attention
entropy grows with log N. Jin et al. scale the logits by sqrt(log_{N_train} N) on top of 1/sqrt(d):

    softmax(sqrt(log_{N_train} N) / sqrt(d) * Q K^T) V

Only self-attention is scaled: cross-attention always attends over the same text tokens.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


class ScaledSelfAttnProcessor:
    """A diffusers attention processor: SDPA with the logit scale of Jin et al. for this layer's token count.

    ``token_ratio`` is N / N_train, the same for every layer of a UNet (each level's token count is the
    pixel count divided by a fixed power of two, exactly so for sides the UNet accepts), so one
    processor serves every self-attention layer and reads N from its input.
    """

    def __init__(self, token_ratio: float) -> None:
        if token_ratio <= 0:
            raise ValueError(f"token_ratio must be positive, got {token_ratio}.")
        self.token_ratio = token_ratio

    def logit_factor(self, tokens: int) -> float:
        """sqrt(log_{N_train} N): 1 at the training size, above 1 for more tokens."""
        return math.sqrt(math.log(tokens) / math.log(tokens / self.token_ratio))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("ScaledSelfAttnProcessor handles self-attention only; it was given encoder_hidden_states.")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_input = hidden_states.ndim == 4
        if image_input:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, attn.heads, -1).transpose(1, 2)

        query, key, value = (heads(proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             scale=attn.scale * self.logit_factor(tokens))
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if image_input:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def self_attention_modules(unet: nn.Module) -> list[nn.Module]:
    """The diffusers ``Attention`` modules of ``unet`` that attend over its own image tokens."""
    return [m for m in unet.modules() if hasattr(m, "set_processor") and not getattr(m, "is_cross_attention", True)]


@contextmanager
def scaled_self_attention(unet: nn.Module, token_ratio: float) -> Iterator[None]:
    """Run every self-attention layer of ``unet`` with Attn-SF for ``token_ratio`` = N / N_train.

    The layers' own processors are put back on exit, also on error, so the caller's UNet is unchanged.
    """
    modules = self_attention_modules(unet)
    if not modules:
        raise ValueError(f"{type(unet).__name__} has no self-attention layers for Attn-SF to scale.")
    processor = ScaledSelfAttnProcessor(token_ratio)
    originals = [m.processor for m in modules]
    try:
        for module in modules:
            module.set_processor(processor)
        yield
    finally:
        for module, original in zip(modules, originals):
            module.set_processor(original)
