"""Stable Diffusion XL: two text encoders and size micro-conditioning set for every stage.

SDXL is told the image size it is drawing (original_size / target_size, crop offset). Each stage
of the cascade gets its own size, so the model is not told it draws 1024x1024 when a stage is 2048
wide, nor the reverse.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import PromptEmbeds
from .sd import LatentBackbone


class SDXLBackbone(LatentBackbone):
    """diffusers ``StableDiffusionXLPipeline``."""

    prompt_options = frozenset({"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                "negative_pooled_prompt_embeds", "clip_skip", "lora_scale"})

    def encode_prompt(
        self, prompt: list[str] | None, negative_prompt: list[str] | None, num_images_per_prompt: int, do_cfg: bool,
        **options: Any,
    ) -> PromptEmbeds:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt,
            device=self.device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            **options,
        )
        return PromptEmbeds(
            embeds=embeds,
            negative=negative if do_cfg else None,
            extra={"text_embeds": pooled},
            negative_extra={"text_embeds": negative_pooled} if do_cfg else {},
        )

    def _projection_dim(self, pooled: torch.Tensor) -> int:
        encoder = self.pipe.text_encoder_2
        return int(pooled.shape[-1]) if encoder is None else encoder.config.projection_dim

    def added_cond_kwargs(self, embeds: PromptEmbeds, height: int, width: int, do_cfg: bool) -> dict:
        pooled = embeds.extra["text_embeds"]
        time_ids = self.pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=embeds.embeds.dtype,
            text_encoder_projection_dim=self._projection_dim(pooled),
        ).to(self.device)
        time_ids = time_ids.repeat(pooled.shape[0], 1)
        if do_cfg:
            pooled = torch.cat([embeds.negative_extra["text_embeds"], pooled])
            time_ids = torch.cat([time_ids, time_ids])
        return {"text_embeds": pooled, "time_ids": time_ids}
