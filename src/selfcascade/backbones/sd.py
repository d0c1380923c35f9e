"""Stable Diffusion 1.x/2.x (eps and v-prediction): a VAE latent space and one CLIP text encoder.

Prompt encoding is the pipeline's own ``encode_prompt`` so textual inversion, clip skip and LoRA
scales behave as they do in diffusers.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .base import Backbone, PromptEmbeds

#: Above this many output pixels the VAE decodes in tiles (an SD VAE needs >10 GB for 2048^2 at once).
DEFAULT_VAE_TILE_ABOVE = 1024 * 1024


class LatentBackbone(Backbone):
    """Shared VAE handling for latent diffusion pipelines (SD and SDXL)."""

    def __init__(self, pipe: Any, vae_tile_above: int | None = DEFAULT_VAE_TILE_ABOVE) -> None:
        super().__init__(pipe.unet, pipe.scheduler)
        self.pipe = pipe
        self.vae = pipe.vae
        self.latent_channels = pipe.unet.config.in_channels
        self.spatial_factor = pipe.vae_scale_factor
        self.vae_tile_above = vae_tile_above
        self.name = pipe.config.get("_name_or_path") or type(pipe).__name__

    def modules(self) -> list[torch.nn.Module]:
        encoders = [getattr(self.pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        return [self.unet, self.vae, *(e for e in encoders if e is not None)]

    # ------------------------------------------------------------------- latent normalisation
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(mean, std) such that ``latent = (vae_latent - mean) / std``; SD uses (0, 1/scaling)."""
        config = self.vae.config
        scale = config.scaling_factor
        mean = getattr(config, "latents_mean", None)
        std = getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            c = like.shape[1]
            mean_t = torch.tensor(mean, device=like.device, dtype=like.dtype).view(1, c, 1, 1)
            std_t = torch.tensor(std, device=like.device, dtype=like.dtype).view(1, c, 1, 1)
            return mean_t, std_t / scale
        shift = getattr(config, "shift_factor", None) or 0.0
        return shift, 1.0 / scale

    @contextmanager
    def _vae_precision(self) -> Iterator[torch.dtype]:
        """SDXL's VAE overflows in fp16 (config.force_upcast): run it in fp32 for the call."""
        original = self.vae.dtype
        upcast = original == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield self.vae.dtype
        finally:
            if upcast:
                self.vae.to(original)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._vae_precision() as dtype:
            mean, std = self._latent_stats(latents)
            z = (latents * std + mean).to(dtype)
            images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._vae_precision() as dtype:
            dist = self.vae.encode((images * 2 - 1).to(self.device, dtype)).latent_dist
            z = dist.mode()
        mean, std = self._latent_stats(z)
        return ((z - mean) / std).to(self.dtype)

    @contextmanager
    def decode_context(self, height: int, width: int, batch_size: int) -> Iterator[None]:
        """Tile above ``vae_tile_above`` pixels and slice batches, then restore the VAE's settings (encoding too)."""
        tiling, slicing = getattr(self.vae, "use_tiling", False), getattr(self.vae, "use_slicing", False)
        if self.vae_tile_above is not None and height * width > self.vae_tile_above:
            self.vae.enable_tiling()
        if batch_size > 1:
            self.vae.enable_slicing()
        try:
            yield
        finally:
            self.vae.use_tiling, self.vae.use_slicing = tiling, slicing


class SDBackbone(LatentBackbone):
    """diffusers ``StableDiffusionPipeline`` (SD 1.x / 2.x)."""

    prompt_options = frozenset({"prompt_embeds", "negative_prompt_embeds", "clip_skip", "lora_scale"})

    def encode_prompt(
        self, prompt: list[str] | None, negative_prompt: list[str] | None, num_images_per_prompt: int, do_cfg: bool,
        **options: Any,
    ) -> PromptEmbeds:
        embeds, negative = self.pipe.encode_prompt(
            prompt, self.device, num_images_per_prompt, do_cfg, negative_prompt=negative_prompt, **options
        )
        return PromptEmbeds(embeds=embeds, negative=negative if do_cfg else None)
