"""Text-to-video UNet3D models: diffusers' ``TextToVideoSDPipeline`` (ModelScope T2V, Zeroscope).

Latents are [B, C, F, H, W]. The cascade scales only H and W; the frame count stays fixed. The sampler
needs nothing video-specific: re-noising is elementwise, the pivot resize acts on the last two dims
(``resize_spatial``, i.e. per frame), and ``UNet3DConditionModel`` folds frames into its batch before
its down blocks, so captured skip features and an upsampler bank's residuals are per frame ([B*F, C, h, w])
with no reshaping of ours. Prompt encoding is SD's (the pipeline's own ``encode_prompt``).

The image VAE decodes ``decode_chunk_size`` frames at a time, so decoding memory is bounded by the
chunk, not the clip length.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .sd import DEFAULT_VAE_TILE_ABOVE, SDBackbone

#: TextToVideoSDPipeline's defaults: 16 frames, guidance 9.
DEFAULT_NUM_FRAMES = 16
DEFAULT_VIDEO_GUIDANCE = 9.0
#: Frames the VAE decodes (or encodes) per call.
DEFAULT_DECODE_CHUNK = 8


class VideoBackbone(SDBackbone):
    """diffusers ``TextToVideoSDPipeline`` (a ``UNet3DConditionModel`` over an SD VAE and CLIP text encoder)."""

    default_guidance_scale = DEFAULT_VIDEO_GUIDANCE
    default_num_frames = DEFAULT_NUM_FRAMES

    def __init__(self, pipe: Any, vae_tile_above: int | None = DEFAULT_VAE_TILE_ABOVE,
                 decode_chunk_size: int = DEFAULT_DECODE_CHUNK) -> None:
        super().__init__(pipe, vae_tile_above)
        self.decode_chunk_size = decode_chunk_size

    @property
    def decode_chunk_size(self) -> int:
        return self._decode_chunk_size

    @decode_chunk_size.setter
    def decode_chunk_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"decode_chunk_size must be a positive number of frames, got {value!r}.")
        self._decode_chunk_size = value

    def _per_frame(self, fn: Callable[[torch.Tensor], torch.Tensor], video: torch.Tensor) -> torch.Tensor:
        """Apply an image function to every frame of [B, C, F, H, W], ``decode_chunk_size`` frames per call."""
        if video.ndim != 5:
            raise ValueError(f"expected a video tensor [B, C, F, H, W], got shape {tuple(video.shape)}.")
        b, _, f = video.shape[:3]
        frames = video.transpose(1, 2).flatten(0, 1)  # [B*F, C, H, W], video-major as the UNet folds them
        out = torch.cat([fn(chunk) for chunk in frames.split(self.decode_chunk_size)])
        return out.unflatten(0, (b, f)).transpose(1, 2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, F, h, w] latents -> [B, 3, F, H, W] frames in [0, 1]."""
        return self._per_frame(super().decode, latents)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] frames in [0, 1] -> latents (pixel-space pivots)."""
        return self._per_frame(super().encode, images)
