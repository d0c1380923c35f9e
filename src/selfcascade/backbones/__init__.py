"""Adapters that give the sampler one interface over different model families."""

from __future__ import annotations

from typing import Any

from .base import Backbone, PromptEmbeds
from .sd import SDBackbone
from .sdxl import SDXLBackbone
from .video import VideoBackbone

__all__ = ["Backbone", "PromptEmbeds", "SDBackbone", "SDXLBackbone", "VideoBackbone", "backbone_from_pipe"]


def backbone_from_pipe(pipe: Any, **kwargs: Any) -> Backbone:
    """Pick the adapter for an already-loaded diffusers pipeline; a pipeline loaded from a local folder takes the
    folder's sampling settings (``selfcascade.json``) and banks."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, TextToVideoSDPipeline

    for pipe_class, backbone_class in ((TextToVideoSDPipeline, VideoBackbone), (StableDiffusionXLPipeline, SDXLBackbone),
                                       (StableDiffusionPipeline, SDBackbone)):
        if isinstance(pipe, pipe_class):
            backbone = backbone_class(pipe, **kwargs)
            backbone.use_model_folder(pipe.config.get("_name_or_path"))  # a local folder's settings and banks
            return backbone
    raise ValueError(
        f"{type(pipe).__name__} is not supported yet; pass a StableDiffusionPipeline, "
        "StableDiffusionXLPipeline or TextToVideoSDPipeline (load one with diffusers' from_pretrained)."
    )
