"""The embedded defaults: small pixel-space text-to-image and text-to-video UNets the project trains and ships.

A model folder holds ``unet/`` and ``scheduler/`` (diffusers ``save_pretrained`` layout) and
``selfcascade_model.json`` naming the text encoder. Pixels are the latents (spatial factor 1), so
decode and encode are just the [-1, 1] <-> [0, 1] maps, elementwise, hence the same for clips
[B, C, F, H, W]. The video model is a ``UNet3DConditionModel`` (the image model inflated with temporal
layers, see ``selfcascade.train_base``); its card's ``num_frames`` makes the backbone a video one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .base import Backbone, PromptEmbeds

#: Where the shipped weights live inside the installed package, by the name that loads them.
SHIPPED = {"embedded": Path(__file__).resolve().parent.parent / "embedded_model",
           "embedded-v2": Path(__file__).resolve().parent.parent / "embedded_model",
           "embedded-video": Path(__file__).resolve().parent.parent / "embedded_video_model",
           "embedded-video-v2": Path(__file__).resolve().parent.parent / "embedded_video_model"}
SHIPPED_DIR = SHIPPED["embedded"]
CONFIG_NAME = "selfcascade_model.json"
#: Scale conditioning: class label per doubling of the object scale, in timestep units (zoom 1, 2, 4, 8 ->
#: 0, 250, 500, 750), fed through the UNet's sinusoidal time projection (``class_embed_type="timestep"``).
ZOOM_LABEL_STEP = 250.0


#: The UNet config that makes a model scale-conditioned (``train-base --scale-conditioning``), like SDXL's size
#: micro-conditioning: the zoom label goes through the time projection into a class embedding.
SCALE_CONDITIONING: dict = {"class_embed_type": "timestep"}


def zoom_label(zoom: float) -> float:
    """The scale-conditioning label of content shown at ``zoom`` times the scale of a base-size image."""
    return ZOOM_LABEL_STEP * math.log2(zoom)


def is_scale_conditioned(unet: torch.nn.Module) -> bool:
    return getattr(unet.config, "class_embed_type", None) == SCALE_CONDITIONING["class_embed_type"]


class EmbeddedBackbone(Backbone):
    """Pixel-space UNet2D/3DConditionModel conditioned on MiniLM token embeddings."""

    spatial_factor = 1

    def __init__(self, unet: torch.nn.Module, scheduler, text_encoder, name: str = "embedded",
                 default_guidance_scale: float | None = None, refine_guidance_scale: float | None = None,
                 num_frames: int | None = None, sampling_k: int | None = None) -> None:
        super().__init__(unet, scheduler)
        self.sampling_k = sampling_k
        self.default_num_frames = num_frames
        self.text_encoder = text_encoder
        self.latent_channels = unet.config.in_channels
        self.name = name
        if default_guidance_scale is not None:
            self.default_guidance_scale = default_guidance_scale
        if refine_guidance_scale is not None:
            self.default_refine_guidance_scale = refine_guidance_scale

    @classmethod
    def from_folder(cls, path: str | Path | None = None, shipped: str = "embedded") -> "EmbeddedBackbone":
        """Load a folder written by ``selfcascade train-base --export`` (default: the shipped model ``shipped``)."""
        import diffusers

        from ..text_encoder import TextEncoder

        folder = Path(path) if path is not None else SHIPPED[shipped]
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            hint = ("the shipped model is missing from this install; reinstall selfcascade or train one with "
                    "`selfcascade train-base --export DIR`") if path is None else "export one with `selfcascade train-base --export DIR`"
            raise FileNotFoundError(f"{config_file} not found: {hint}.")
        config = json.loads(config_file.read_text())
        # Shipped weights are stored in fp16 (half the size); compute starts in fp32 and .to() picks the dtype.
        unet_class = json.loads((folder / "unet" / "config.json").read_text())["_class_name"]
        if unet_class not in ("UNet2DConditionModel", "UNet3DConditionModel"):
            raise ValueError(f"{folder / 'unet'} holds a {unet_class}; the embedded backbone takes a UNet2DConditionModel "
                             "or UNet3DConditionModel.")
        unet = getattr(diffusers, unet_class).from_pretrained(folder / "unet", use_safetensors=True,
                                                              torch_dtype=torch.float32)
        scheduler = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
        encoder = TextEncoder(max_length=int(config.get("max_length", 32)))
        name = shipped if path is None else str(folder)
        backbone = cls(unet, scheduler, encoder, name=name, default_guidance_scale=config.get("guidance_scale"),
                       refine_guidance_scale=config.get("refine_guidance_scale"), num_frames=config.get("num_frames"),
                       sampling_k=config.get("K"))
        backbone.model_dir = folder
        return backbone

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.text_encoder.model]

    def scale_label(self, height: int, width: int) -> float | None:
        """Scale-conditioned models (``train-base --scale-conditioning``) learn that a window of a stage
        ``zoom`` times the base area shows emoji parts at ``sqrt(zoom)`` times their usual size."""
        if not is_scale_conditioned(self.unet):
            return None
        base_h, base_w = self.base_size
        return zoom_label(math.sqrt(height * width / (base_h * base_w)))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "EmbeddedBackbone":
        # diffusers warns on any .to(dtype=...), even a no-op one; only cast when it changes something.
        self.unet.to(device)
        if dtype is not None and dtype != self.dtype:
            self.unet.to(dtype=dtype)
        self.text_encoder.model.to(device)
        self.text_encoder.device = torch.device(device)
        return self

    def encode_prompt(
        self, prompt: list[str], negative_prompt: list[str] | None, num_images_per_prompt: int, do_cfg: bool
    ) -> PromptEmbeds:
        def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            hidden, mask = self.text_encoder.encode(texts)
            return (hidden.to(self.device, self.dtype).repeat_interleave(num_images_per_prompt, 0),
                    mask.to(self.device).repeat_interleave(num_images_per_prompt, 0))

        embeds, mask = encode(prompt)
        if self.is_video:  # UNet3DConditionModel takes no encoder_attention_mask: it attends to padding, as trained
            mask = None
        if not do_cfg:
            return PromptEmbeds(embeds=embeds, mask=mask)
        negative, negative_mask = encode(negative_prompt or [""] * len(prompt))
        return PromptEmbeds(embeds=embeds, negative=negative, mask=mask, negative_mask=None if mask is None else negative_mask)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (images * 2 - 1).to(self.device, self.dtype)
