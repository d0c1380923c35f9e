"""Adapters that give the sampler one interface over different model families."""

from __future__ import annotations

from typing import Any

from .base import Backbone, PromptEmbeds
from .sd import SDBackbone
from .sdxl import SDXLBackbone
from .video import VideoBackbone

__all__ = ["Backbone", "PromptEmbeds", "SDBackbone", "SDXLBackbone", "VideoBackbone", "backbone_from_pipe"]


def backbone_from_pipe(pipe: Any, **kwargs: Any) -> Backbone:
    """Pick the adapter for an already-loaded diffusers pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, TextToVideoSDPipeline

    if isinstance(pipe, TextToVideoSDPipeline):
        return VideoBackbone(pipe, **kwargs)
    if isinstance(pipe, StableDiffusionXLPipeline):
        return SDXLBackbone(pipe, **kwargs)
    if isinstance(pipe, StableDiffusionPipeline):
        return SDBackbone(pipe, **kwargs)
    raise ValueError(
        f"{type(pipe).__name__} is not supported yet; pass a StableDiffusionPipeline, "
        "StableDiffusionXLPipeline or TextToVideoSDPipeline (load one with diffusers' from_pretrained)."
    )
