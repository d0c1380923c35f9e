"""The one interface the sampler sees: encode a prompt, predict noise at any size, decode, encode.

A backbone wraps a frozen denoiser (a diffusers UNet) plus whatever turns prompts into its
conditioning and latents into pixels. Everything model-specific lives in a subclass; the cascade in
``selfcascade.cascade`` never branches on the model family.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from ..schedule import matched_k


#: Sampling defaults a model folder can carry beside its weights (a stock diffusers folder ignores the file):
#: ``guidance_scale``, ``refine_guidance_scale``, ``K``, ``pivot_space``, ``zoom_cue``, ``zoom_factors`` (see
#: ``Backbone``).
MODEL_SETTINGS_FILE = "selfcascade.json"
#: How a pivot is upsampled to the next stage: in latents (the paper) or in pixels (decode, resize, encode).
PivotSpace = Literal["latent", "pixel"]
PIVOT_SPACES: tuple[str, ...] = get_args(PivotSpace)
#: Feature-upsampler banks tuned on a model (``<model>/banks/<name>/``), tuned mode's default.
BANKS_DIR = "banks"


def zoom_prompt(prompt: str, zoom: int, cue: str) -> str:
    """``prompt`` with a scale cue (``cue`` formats ``{prompt}`` and ``{zoom}``); zoom 1 adds nothing, and the empty
    prompt (guidance's unconditional branch, trained without a cue) stays empty."""
    return prompt if zoom <= 1 or not prompt else cue.format(prompt=prompt, zoom=zoom)


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch, positive and (optional) negative, not yet in CFG layout."""

    embeds: torch.Tensor
    negative: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_extra: dict[str, torch.Tensor] = field(default_factory=dict)
    #: The same prompts with the scale cue of each zoom > 1 (models trained with one, ``Backbone.zoom_cue``).
    zoomed: dict[int, "PromptEmbeds"] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    def select(self, rows: slice) -> "PromptEmbeds":
        """The conditioning of images ``rows`` only (a chunk of the batch), zoomed variants included."""
        def cut(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]

        return PromptEmbeds(
            embeds=self.embeds[rows], negative=cut(self.negative), mask=cut(self.mask),
            negative_mask=cut(self.negative_mask), extra={k: v[rows] for k, v in self.extra.items()},
            negative_extra={k: v[rows] for k, v in self.negative_extra.items()},
            zoomed={zoom: e.select(rows) for zoom, e in self.zoomed.items()},
        )


class Backbone:
    """Frozen UNet + scheduler + the model-specific pieces around them.

    Subclasses set ``latent_channels``, ``spatial_factor`` (pixels per latent cell) and implement
    ``encode_prompt``, ``decode`` and ``encode``; SDXL also overrides ``added_cond_kwargs``; video
    backbones set ``default_num_frames``.
    """

    latent_channels: int
    spatial_factor: int
    #: Model identity written into outputs and upsampler banks (hub id, folder, or name).
    name: str = "unknown"
    #: Classifier-free guidance used when the caller gives none (SD's customary 7.5).
    default_guidance_scale: float = 7.5
    #: Guidance at stages r >= 1 when the caller gives none (None: as stage 0). A small model can need
    #: less there: guidance pushes each patch of the re-noised pivot toward a whole object, i.e. repetition.
    default_refine_guidance_scale: float | None = None
    #: Frames per clip when the caller gives none; None for image models (latents [B, C, H, W]).
    default_num_frames: int | None = None
    #: K when the caller gives none, chosen by measurement for this model (None: the paper's K by signal level).
    sampling_k: int | None = None
    #: How the cascade upsamples pivots when the caller does not say: "latent" (the paper) or "pixel" (decode,
    #: resize, encode), chosen by measurement for this model.
    pivot_space: PivotSpace = "latent"
    #: The scale cue the model was trained with (e.g. ``"{prompt}, {zoom}x zoom"``), or None: every stage above
    #: the base size then gets the cue of its zoom (the nearest of ``zoom_factors``) after the prompt.
    zoom_cue: str | None = None
    zoom_factors: tuple[int, ...] = ()
    #: The model's folder, where its settings file and shipped banks live (None: a hub id or in-memory model).
    model_dir: Path | None = None
    #: Keyword arguments of diffusers' ``encode_prompt`` this backbone passes through (precomputed embeddings,
    #: ``clip_skip``, ``lora_scale``); a model with its own text encoder takes none.
    prompt_options: frozenset[str] = frozenset()

    def __init__(self, unet: torch.nn.Module, scheduler: Any) -> None:
        self.unet = unet
        self.scheduler = scheduler

    def freeze(self) -> None:
        """Eval mode and no gradients for every model of the backbone (training banks needs a frozen base).

        Not done on wrapping: ``from_pipe`` leaves the user's pipeline as it was; sampling runs under no_grad.
        """
        for module in self.modules():
            module.requires_grad_(False)
            module.eval()

    def modules(self) -> list[torch.nn.Module]:
        """The backbone's networks."""
        return [self.unet]

    def use_model_folder(self, folder: str | Path | None) -> None:
        """Take the sampling defaults of ``folder/selfcascade.json`` and the banks under ``folder/banks``, if any."""
        if folder is None or not Path(folder).is_dir():
            return
        self.model_dir = Path(folder)
        settings_file = self.model_dir / MODEL_SETTINGS_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        if settings.get("guidance_scale") is not None:
            self.default_guidance_scale = float(settings["guidance_scale"])
        if settings.get("refine_guidance_scale") is not None:
            self.default_refine_guidance_scale = float(settings["refine_guidance_scale"])
        if settings.get("K") is not None:
            self.sampling_k = int(settings["K"])
        if settings.get("pivot_space") is not None:
            if settings["pivot_space"] not in PIVOT_SPACES:
                raise ValueError(f"{settings_file}: pivot_space must be {' or '.join(map(repr, PIVOT_SPACES))}, got "
                                 f"{settings['pivot_space']!r}.")
            self.pivot_space = settings["pivot_space"]
        if settings.get("zoom_cue"):
            self.zoom_cue = str(settings["zoom_cue"])
            self.zoom_factors = tuple(int(z) for z in settings.get("zoom_factors", (2, 4)))
        if settings.get("num_frames") is not None and self.is_video:  # the clip length a video model was trained on
            self.default_num_frames = int(settings["num_frames"])

    def model_settings(self) -> dict[str, Any]:
        """The sampling defaults ``use_model_folder`` reads, as ``selfcascade.json`` holds them (unset ones left out)."""
        settings = {"guidance_scale": self.default_guidance_scale, "refine_guidance_scale": self.default_refine_guidance_scale,
                    "K": self.sampling_k, "pivot_space": None if self.pivot_space == "latent" else self.pivot_space,
                    "zoom_cue": self.zoom_cue,
                    "zoom_factors": list(self.zoom_factors) if self.zoom_cue else None,
                    "num_frames": self.default_num_frames}
        return {k: v for k, v in settings.items() if v is not None}

    # ----------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        """Where the sampler computes: the UNet's parameters, unless accelerate hooks (CPU offload, ``device_map``)
        keep them elsewhere and move them to their execution device for each forward."""
        for module in self.unet.modules():
            device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
            if device is not None:
                return torch.device(device)
        return next(self.unet.parameters()).device

    @property
    def default_k(self) -> int | None:
        """K when the caller gives none: the paper's K=700 carried over to this model's noise schedule.

        700 on SD/SDXL; 494 on the v2 embedded model's DDPM-linear schedule. None if the scheduler has no
        ``alphas_cumprod`` (then 700 of 1000 applies). A model's own ``sampling_k`` comes first.
        """
        if self.sampling_k is not None:
            return self.sampling_k
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        return None if alphas_cumprod is None else matched_k(alphas_cumprod)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def size_multiple(self) -> int:
        """Every side in pixels must divide by this: each UNet downsampling halves the latent."""
        downsamplings = sum(
            1 for block in self.unet.down_blocks if getattr(block, "downsamplers", None) is not None
        )
        return self.spatial_factor * 2**downsamplings

    @property
    def final_multiple(self) -> int:
        """What the target's sides must divide by: one latent cell (diffusers' own check, 8 px on SD/SDXL); the
        UNet pads odd latent sizes itself, so only the intermediate stages round to ``size_multiple``."""
        return self.spatial_factor

    @property
    def base_size(self) -> tuple[int, int]:
        """The size (pixels, HxW) the UNet was trained at, read from its config."""
        sample = self.unet.config.sample_size
        h, w = (sample, sample) if isinstance(sample, int) else sample
        return h * self.spatial_factor, w * self.spatial_factor

    def stage_guidance(self, num_stages: int) -> list[float]:
        """The model's default guidance scale for each stage of a plan."""
        refine = self.default_refine_guidance_scale
        return [self.default_guidance_scale] + [self.default_guidance_scale if refine is None else refine] * (num_stages - 1)

    def default_banks(self, stage_sizes: list[tuple[int, int]]) -> list[str] | None:
        """The banks under ``<model>/banks/``, one per stage r >= 1: the one tuned for the nearest side (tuned
        mode's default); None when the model ships none."""
        if self.model_dir is None:
            return None
        tuned_for = {}
        for config in sorted((self.model_dir / BANKS_DIR).glob("*/config.json")):
            tuned_for[config.parent] = json.loads(config.read_text()).get("train_size", [0])[0]
        if not tuned_for:
            return None
        return [str(min(tuned_for, key=lambda bank: abs(tuned_for[bank] - max(size)))) for size in stage_sizes]

    def stage_prompts(self, prompts: list[str], height: int, width: int) -> list[str]:
        """The prompts as the model should read them at a stage of this size: with the scale cue of its zoom."""
        zoom = self.stage_zoom(height, width)
        return [zoom_prompt(p, zoom, self.zoom_cue) for p in prompts] if zoom > 1 else list(prompts)

    def stage_zoom(self, height: int, width: int) -> int:
        """The scale cue's zoom for a stage of this size: how many times larger than at the base size it shows its
        object (by side), snapped to the nearest zoom the model was trained with; 1 at the base size or without a cue."""
        base_h, base_w = self.base_size
        zoom = math.sqrt(height * width / (base_h * base_w))
        if not self.zoom_cue or zoom < math.sqrt(2):
            return 1
        return min(self.zoom_factors, key=lambda z: abs(math.log(z / zoom)))

    @property
    def is_video(self) -> bool:
        return self.default_num_frames is not None

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int | None = None) -> tuple[int, ...]:
        """Shape of the latents of ``batch`` samples at ``height x width`` pixels ([B, C, F, h, w] for video)."""
        spatial = (height // self.spatial_factor, width // self.spatial_factor)
        if self.is_video:
            return batch, self.latent_channels, self.default_num_frames if num_frames is None else num_frames, *spatial
        if num_frames is not None:
            raise ValueError(f"{self.name} is an image model: num_frames applies only to text-to-video models "
                             "(e.g. a TextToVideoSDPipeline or 'embedded-video').")
        return batch, self.latent_channels, *spatial

    # ------------------------------------------------------------------------ model specifics
    def encode_prompt(
        self, prompt: list[str] | None, negative_prompt: list[str] | None, num_images_per_prompt: int, do_cfg: bool,
        **options: Any,
    ) -> PromptEmbeds:
        """``options``: any of ``prompt_options`` (checked by the caller)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], shape (B, 3, H, W) (video: (B, 3, F, H, W)), float32."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (the inverse of ``decode``), used for pixel-space pivots."""
        raise NotImplementedError

    def added_cond_kwargs(self, embeds: PromptEmbeds, height: int, width: int, do_cfg: bool) -> dict | None:
        """Extra UNet conditioning that depends on the stage size (SDXL micro-conditioning)."""
        return None

    def scale_label(self, height: int, width: int) -> float | None:
        """Class label telling a scale-conditioned UNet how large content is at this stage size; None if unused."""
        return None

    def decode_context(self, height: int, width: int, batch_size: int) -> AbstractContextManager:
        """Memory measures (VAE tiling/slicing) for decoding at this size; none by default."""
        return nullcontext()

    # ------------------------------------------------------------------------------ denoising
    def unet_inputs(self, embeds: PromptEmbeds, height: int, width: int, do_cfg: bool) -> dict[str, Any]:
        """UNet keyword arguments for one stage, in the CFG batch layout [negative, positive]."""
        embeds = embeds.zoomed.get(self.stage_zoom(height, width), embeds)
        hidden, mask = embeds.embeds, embeds.mask
        if do_cfg:
            if embeds.negative is None:
                raise ValueError("classifier-free guidance needs negative embeddings; encode with do_cfg=True.")
            hidden = torch.cat([embeds.negative, hidden])
            if mask is not None:
                mask = torch.cat([embeds.negative_mask, mask])
        inputs: dict[str, Any] = {"encoder_hidden_states": hidden}
        if mask is not None:
            inputs["encoder_attention_mask"] = mask
        added = self.added_cond_kwargs(embeds, height, width, do_cfg)
        if added is not None:
            inputs["added_cond_kwargs"] = added
        label = self.scale_label(height, width)
        if label is not None:
            inputs["class_labels"] = torch.full((hidden.shape[0],), label, device=hidden.device)
        return inputs

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        inputs: dict[str, Any],
        guidance_scale: float,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """One guided model evaluation; ``unet_kwargs`` carries e.g. added skip residuals."""
        do_cfg = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = self.scheduler.scale_model_input(model_input, t)
        out = self.unet(model_input, t, **inputs, **unet_kwargs, return_dict=False)[0]
        if do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return out

    # --------------------------------------------------------------------------------- resize
    def resize_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Bilinear resize of latents to the stage size given in pixels (the paper's phi); per frame for video."""
        size = (height // self.spatial_factor, width // self.spatial_factor)
        return resize_spatial(latents.float(), size, "bilinear").to(latents.dtype)

    def resize_in_pixels(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Decode, resize with an antialiased bicubic filter, encode again: sharper than latent bilinear."""
        images = resize_spatial(self.decode(latents), (height, width), "bicubic", antialias=True)
        return self.encode(images.clamp(0, 1))


def resize_spatial(x: torch.Tensor, size: tuple[int, int], mode: str, antialias: bool = False) -> torch.Tensor:
    """Interpolate the last two (spatial) dims of a tensor of any rank >= 3, e.g. each frame of a video.

    The leading dims are folded into interpolate's channel dim, which it treats independently, so a
    [B, C, F, H, W] video is resized frame by frame exactly as each [B, C, H, W] frame would be.
    """
    flat = x.reshape(-1, *x.shape[-3:])
    out = F.interpolate(flat, size=size, mode=mode, align_corners=False, antialias=antialias)
    return out.reshape(*x.shape[:-2], *size)
