"""The user-facing entry point: wrap a model, call it with a prompt and a size.

    pipe = StableDiffusionPipeline.from_pretrained("stabilityai/stable-diffusion-2-1-base")
    cascade = SelfCascadePipeline.from_pipe(pipe)
    image = cascade("a photo of a corgi", height=2048, width=2048, seed=0).images[0]

    video_pipe = TextToVideoSDPipeline.from_pretrained("ali-vilab/text-to-video-ms-1.7b")
    frames = SelfCascadePipeline.from_pipe(video_pipe)("a corgi running", 512, 512, num_frames=16).frames[0]

Every mode (direct, tuning-free, tuned, and the baselines attn-sf, redilate, hires-fix) is a configuration
of the same run through ``sample_cascade``; tuned mode adds a bank of feature upsamplers
(``selfcascade.upsamplers``) to stages r >= 1, the baselines are described in ``selfcascade.baselines``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from .backbones import Backbone, backbone_from_pipe
from .backbones.base import zoom_prompt
from .baselines import BASELINE_MODES, baseline_context, hires_fix
from .baselines.rivals import (FULL_SCHEDULE_RIVALS, RIVAL_MODES, RIVAL_PIVOT_SPACE, SINGLE_STAGE_RIVALS, rival_context,
                               rival_plan, rival_sampler)
from .cascade import PivotSpace, StepCallback, check_scheduler, resolve_k, sample_cascade
from .plan import DEFAULT_MAX_RATIO, ScalePlan, make_plan
from .unet_features import tuned_stage_context
from .window_attention import windowed_final_stage
from .upsamplers import UpsamplerBank, load_bank

logger = logging.getLogger(__name__)

Mode = Literal["tuning-free", "direct", "tuned", "attn-sf", "redilate", "hires-fix", "hidiffusion", "demofusion",
               "freescale", "deep-shrink"]
MODES: tuple[str, ...] = ("tuning-free", "direct", "tuned", *BASELINE_MODES, *RIVAL_MODES)
#: Modes that sample the target in one pass, from noise.
SINGLE_STAGE_MODES = frozenset({"direct", "attn-sf", "redilate", *SINGLE_STAGE_RIVALS})
#: Modes for video models: attn-sf and redilate alter attention and convolutions chosen for image UNets
#: (attn-sf would also rescale the temporal attention over frames).
VIDEO_MODES: tuple[str, ...] = tuple(m for m in MODES if m not in ("attn-sf", "redilate", *RIVAL_MODES))
#: A bank, its folder or hub id; or one per stage r >= 1 (None: that stage runs tuning-free).
Upsamplers = UpsamplerBank | str | os.PathLike | Sequence["UpsamplerBank | str | os.PathLike | None"]
OutputType = Literal["pil", "np", "pt", "latent"]
#: Name under which the model the project trains and ships is loaded.
EMBEDDED_NAME = "embedded"
#: Names that load a model shipped inside the package (the image default and its video sibling).
EMBEDDED_NAMES = (EMBEDDED_NAME, "embedded-video")


def default_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators; fp32 on CPU, where half precision is slower, not faster."""
    return torch.float32 if device.type == "cpu" else torch.float16


#: Odd 64-bit constant (golden ratio) whose low 32 bits are non-zero: torch's CPU generator keeps only the
#: low 32 bits of a seed, so stage offsets must change those.
_STAGE_SEED_STEP = 0x9E3779B97F4A7C15


def stage_seed(seed: int, stage: int) -> int:
    """Each stage draws from its own stream so changing the plan's tail never shifts earlier stages.

    Stage 0 uses the seed itself, so direct inference matches the diffusers pipeline with that seed.
    """
    return seed if stage == 0 else (seed + stage * _STAGE_SEED_STEP) % 2**63


@dataclass
class CascadeOutput:
    """Images of the last stage, optionally every stage, and what is needed to regenerate them."""

    images: Any
    plan: ScalePlan
    seeds: list[int]
    settings: dict[str, Any]
    stages: list[Any] = field(default_factory=list)

    @property
    def frames(self) -> Any:
        """Video models: the clips (``images`` under the name diffusers' video pipelines use)."""
        return self.images


def _to_output(images: torch.Tensor, output_type: OutputType) -> Any:
    """Images [B, 3, H, W] -> pt as is, np [B, H, W, 3], or PIL images; videos [B, 3, F, H, W] -> pt
    [B, F, 3, H, W], np [B, F, H, W, 3], or one list of PIL frames per clip (diffusers' video layouts)."""
    if images.ndim == 5:
        frames = images.transpose(1, 2)
        if output_type == "pt":
            return frames.cpu()
        clips = [_to_output(clip, output_type) for clip in frames]
        return np.stack(clips) if output_type == "np" else clips
    if output_type == "pt":
        return images.cpu()
    array = images.permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in array]


class SelfCascadePipeline:
    """Self-cascade sampling (arXiv 2402.10491) over a frozen pretrained diffusion model."""

    def __init__(self, backbone: Backbone, max_ratio: float = DEFAULT_MAX_RATIO) -> None:
        check_scheduler(backbone.scheduler)
        self.backbone = backbone
        self.max_ratio = max_ratio

    # ---------------------------------------------------------------------------- loading
    @classmethod
    def from_pipe(cls, pipe: Any, scheduler: str | Any = "ddim", **kwargs: Any) -> "SelfCascadePipeline":
        """Wrap a loaded diffusers pipeline without changing it.

        ``scheduler``: "ddim" (the paper's sampler, built from the pipeline's scheduler config),
        "pipeline" (keep the pipeline's own), or a diffusers scheduler instance.
        """
        backbone = backbone_from_pipe(pipe, **kwargs)
        backbone.scheduler = _make_scheduler(scheduler, pipe.scheduler)
        return cls(backbone)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = EMBEDDED_NAME,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        scheduler: str | Any = "ddim",
        **kwargs: Any,
    ) -> "SelfCascadePipeline":
        """Load a hub id, a local diffusers folder, or a shipped model ("embedded", "embedded-video").

        Hub ids go through diffusers' own ``DiffusionPipeline.from_pretrained`` (and its cache).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        path = Path(name_or_path)
        if str(name_or_path) in EMBEDDED_NAMES or (path / "selfcascade_model.json").is_file():
            from .backbones.embedded import EmbeddedBackbone

            name = str(name_or_path)
            backbone = (EmbeddedBackbone.from_folder(shipped=name) if name in EMBEDDED_NAMES
                        else EmbeddedBackbone.from_folder(path))
            backbone.scheduler = _make_scheduler(scheduler, backbone.scheduler)
            backbone.to(device, dtype)
            return cls(backbone)
        if path.exists() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} has no model_index.json: point at a folder written by a diffusers pipeline's "
                "save_pretrained (or a hub id, or 'embedded')."
            )
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
        pipe.to(device)
        return cls.from_pipe(pipe, scheduler=scheduler)

    # ------------------------------------------------------------------------------ helpers
    def plan(self, height: int, width: int, mode: Mode = "tuning-free") -> ScalePlan:
        """The stage sizes a call with this target would use."""
        bb = self.backbone
        plan = make_plan(
            bb.base_size, height, width, multiple=bb.size_multiple,
            max_ratio=self.max_ratio, single_stage=mode in SINGLE_STAGE_MODES, single_jump=mode == "hires-fix",
        )
        return rival_plan(mode, bb.base_size, height, width, bb.size_multiple) or plan

    def weights_fingerprint(self, height: int, width: int, mode: Mode = "tuning-free",
                            upsamplers: Upsamplers | None = None) -> str:
        """A short digest of the weights a call with these settings runs (the UNet, and tuned mode's banks), so
        caches of generated images never serve images of other weights. Every tensor is sampled sparsely: cheap
        for billion-parameter UNets, yet any training step (which moves nearly every weight) changes it."""
        modules = [self.backbone.unet]
        if mode == "tuned":
            modules += [b for b in self._stage_banks(upsamplers, self.plan(height, width, mode)) if b is not None]
        digest = hashlib.sha1()
        for module in modules:
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().flatten()
                digest.update(name.encode())
                digest.update(flat[::max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_inputs(
        self, prompt: Any, negative_prompt: Any, mode: str, num_inference_steps: int, num_images_per_prompt: int,
        pivot_space: str | None, output_type: str, num_frames: int | None = None,
    ) -> list[str]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        if negative_prompt is not None and not isinstance(negative_prompt, str) and len(negative_prompt) != len(prompt):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompt)} prompts; give one each or one string.")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        if pivot_space not in (None, "latent", "pixel"):
            raise ValueError(f"pivot_space must be 'latent' or 'pixel', got {pivot_space!r}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of pil, np, pt, latent, got {output_type!r}.")
        if self.backbone.is_video:
            if mode not in VIDEO_MODES:
                raise ValueError(f"mode {mode!r} is not supported for video models; "
                                 f"use one of {', '.join(VIDEO_MODES)}.")
            if num_frames is not None and (isinstance(num_frames, bool) or not isinstance(num_frames, int)
                                           or num_frames < 1):
                raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}.")
        elif num_frames is not None:
            raise ValueError(f"num_frames applies only to text-to-video models; {self.backbone.name} makes images.")
        return prompt

    @staticmethod
    def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
        if seed is None:
            return [int(s) for s in torch.randint(0, 2**31 - 1, (count,))]
        if isinstance(seed, int):
            return [seed + i for i in range(count)]
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"got {len(seeds)} seeds for {count} images; give one per image or a single int.")
        return seeds

    def _stage_banks(self, upsamplers: Upsamplers | None, plan: ScalePlan) -> list[UpsamplerBank | None]:
        """One loaded, checked bank (or None) per stage r >= 1."""
        if upsamplers is None:
            upsamplers = self.backbone.default_banks(list(plan.stages[1:]))
        if upsamplers is None:
            raise ValueError("mode='tuned' needs upsamplers=: an UpsamplerBank, or a folder or hub id written by "
                             "`selfcascade train-upsamplers` (or use mode='tuning-free').")
        if isinstance(upsamplers, (UpsamplerBank, str, os.PathLike)):
            upsamplers = [upsamplers] * (plan.num_stages - 1)
        elif len(upsamplers) != plan.num_stages - 1:
            raise ValueError(f"got {len(upsamplers)} upsampler banks for the {plan.num_stages - 1} upsampling stage(s) "
                             "of this plan; give one bank for all or one (or None) per stage after the first.")
        bb = self.backbone
        banks: list[UpsamplerBank | None] = []
        for given in upsamplers:
            bank = None if given is None else load_bank(given)
            if bank is not None:
                bank.check_compatible(bb.unet, bb.name)
                bank.to(bb.device).eval()
            banks.append(bank)
        return banks

    @staticmethod
    def _guidance(guidance_scale: float | Sequence[float], stages: int) -> list[float]:
        if isinstance(guidance_scale, (int, float)):
            return [float(guidance_scale)] * stages
        scales = [float(g) for g in guidance_scale]
        if len(scales) != stages:
            raise ValueError(f"got {len(scales)} guidance scales for a {stages}-stage plan; give one per stage or one number.")
        return scales

    # -------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        *,
        mode: Mode = "tuning-free",
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        num_frames: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | Sequence[float] | None = None,
        K: int | None = None,
        noise_level: float | None = None,
        pivot_space: PivotSpace | None = None,
        strength: float | None = None,
        seed: int | Sequence[int] | None = None,
        return_stages: bool = False,
        output_type: OutputType = "pil",
        callback: StepCallback | None = None,
        progress: bool = True,
        upsamplers: Upsamplers | None = None,
        image: torch.Tensor | None = None,
        window_attention: bool = False,
    ) -> CascadeOutput:
        """Generate ``height x width`` images or clips (default: 2x the base size per side, 4x pixels).

        ``num_frames`` (video models only; default 16) is fixed across stages: only height and width grow.

        K (or ``noise_level`` = K/T) is how far each pivot is diffused back before it is denoised at
        the next size: higher keeps less of the pivot and invents more detail (paper: K=700 of 1000).
        ``guidance_scale`` (default: the model's own, 7.5 for SD) may be a list with one value per stage.
        ``pivot_space``: "latent" (default, the paper) or "pixel" (decode, bicubic resize, encode; the
        default of mode="hires-fix").
        ``strength`` (mode="hires-fix" only, default 0.55): the img2img strength; K = strength * T.
        ``seed`` gives image i the seed ``seed + i`` (or pass one seed per image), so any image can be
        regenerated alone.
        ``upsamplers`` (mode="tuned"): a tuned feature-upsampler bank, its folder or hub id, or one per
        stage after the first; a bank shaped for another model raises a ValueError.
        ``image``: upscale this instead of sampling stage 0: [B, 3, H, W] (video: [B, 3, F, H, W]) in [0, 1] at
        the plan's first size (the model's base size), one per prompt and image.
        ``window_attention``: the cascade's final stage runs its top-level self-attention in shifted 2x2 windows
        (HiDiffusion's MSW-MSA; ``selfcascade.window_attention``).
        """
        bb = self.backbone
        # 1. check inputs and resolve defaults
        prompts = self.check_inputs(prompt, negative_prompt, mode, num_inference_steps, num_images_per_prompt,
                                    pivot_space, output_type, num_frames)
        if bb.is_video and num_frames is None:
            num_frames = bb.default_num_frames
        base_h, base_w = bb.base_size
        height = base_h * 2 if height is None else height
        width = base_w * 2 if width is None else width
        plan = self.plan(height, width, mode)
        num_train_timesteps = bb.scheduler.config.num_train_timesteps
        if mode == "hires-fix":
            if K is not None or noise_level is not None:
                raise ValueError("mode='hires-fix' takes strength= (the img2img strength, K = strength * T), "
                                 "not K or noise_level.")
            strength = hires_fix.DEFAULT_STRENGTH if strength is None else strength
            k = hires_fix.strength_to_k(strength, num_train_timesteps)
            pivot_space = pivot_space or hires_fix.PIVOT_SPACE
        else:
            if strength is not None:
                raise ValueError(f"strength only applies to mode='hires-fix', got mode={mode!r} "
                                 "(the cascade's equivalent is noise_level).")
            if mode in FULL_SCHEDULE_RIVALS and (K is not None or noise_level is not None):
                raise ValueError(f"mode={mode!r} re-noises every stage fully (K = T); it takes no K or noise_level.")
            k = (num_train_timesteps if mode in FULL_SCHEDULE_RIVALS
                 else resolve_k(num_train_timesteps, K, noise_level, default=bb.default_k))
            pivot_space = pivot_space or RIVAL_PIVOT_SPACE.get(mode, "latent")
        guidance = (bb.stage_guidance(plan.num_stages) if guidance_scale is None
                    else self._guidance(guidance_scale, plan.num_stages))
        batch = len(prompts) * num_images_per_prompt
        seeds = self._seeds(seed, batch)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if upsamplers is not None and mode != "tuned":
            raise ValueError(f"upsamplers only apply to mode='tuned', got mode={mode!r}.")
        banks = self._stage_banks(upsamplers, plan) if mode == "tuned" else None
        if window_attention and (mode not in ("tuning-free", "tuned") or plan.num_stages < 2):
            raise ValueError("window_attention windows the final stage of a cascade: use mode='tuning-free' or "
                             f"'tuned' with a target above the base size, not mode={mode!r} at {height}x{width}.")

        # 2. encode the prompt once for all stages (and once per zoom for a model trained with a scale cue)
        do_cfg = any(g > 1.0 for g in guidance)
        embeds = bb.encode_prompt(prompts, negatives, num_images_per_prompt, do_cfg)
        for zoom in sorted({bb.stage_zoom(h, w) for h, w in plan.stages} - {1}):
            embeds.zoomed[zoom] = bb.encode_prompt([zoom_prompt(p, zoom, bb.zoom_cue) for p in prompts], negatives,
                                                   num_images_per_prompt, do_cfg)

        # 3. one generator per image per stage
        gen_device = "cpu" if bb.device.type == "mps" else bb.device
        generators = [
            [torch.Generator(gen_device).manual_seed(stage_seed(s, r)) for s in seeds] for r in range(plan.num_stages)
        ]

        start = None
        if image is not None:
            if mode in SINGLE_STAGE_MODES:
                raise ValueError(f"image= is upscaled by the later stages of a cascade; mode={mode!r} has none.")
            if mode in RIVAL_MODES:
                raise ValueError(f"image= is upscaled by the cascade's own stages; mode={mode!r} does not take it.")
            start = bb.encode(image.to(bb.device, torch.float32))

        # 4. sample every stage (attn-sf, redilate, hidiffusion and deep-shrink alter the UNet for this call only;
        #    demofusion and freescale bring their own step loop)
        stage_context = tuned_stage_context(bb.unet, banks) if banks is not None else None
        if window_attention:
            stage_context = windowed_final_stage(bb.unet, plan.num_stages, stage_context)
        sampler = rival_sampler(mode) or sample_cascade
        with baseline_context(mode, bb.unet, plan, num_train_timesteps), rival_context(mode, bb, num_inference_steps, seeds[0]):
            result = sampler(
                bb, plan, embeds, generators, num_inference_steps=num_inference_steps, k=k,
                guidance_scales=guidance, pivot_space=pivot_space, callback=callback, progress=progress,
                stage_context=stage_context, num_frames=num_frames, start_latents=start,
            )

        # 5. decode
        wanted = result.stage_latents if return_stages else result.stage_latents[-1:]
        decoded = []
        for (h, w), latents in zip(plan.stages[-len(wanted):], wanted):
            if output_type == "latent":
                decoded.append(latents)
                continue
            with torch.no_grad(), bb.decode_context(h, w, batch):
                decoded.append(_to_output(bb.decode(latents), output_type))
        settings = {
            "model": bb.name, "mode": mode, "height": height, "width": width, "steps": num_inference_steps,
            "guidance_scale": guidance, "K": k, "pivot_space": pivot_space,
            "scheduler": type(bb.scheduler).__name__, "stages": [list(s) for s in plan.stages],
            "prompt": prompts, "negative_prompt": negatives,
        }
        if embeds.zoomed:
            settings["zoom_cue"] = bb.zoom_cue
        if num_frames is not None:
            settings["num_frames"] = num_frames
        if window_attention:
            settings["window_attention"] = True
        if mode == "hires-fix":
            settings["strength"] = strength
        if banks is not None:
            settings["upsamplers"] = [None if b is None else b.config.get("_name_or_path", "in-memory") for b in banks]
        return CascadeOutput(images=decoded[-1], plan=plan, seeds=seeds, settings=settings,
                             stages=decoded if return_stages else [])


def _make_scheduler(choice: str | Any, current: Any) -> Any:
    if isinstance(choice, str):
        if choice == "pipeline":
            return current
        if choice == "ddim":
            from diffusers import DDIMScheduler

            return DDIMScheduler.from_config(current.config)
        raise ValueError(f"scheduler must be 'ddim', 'pipeline' or a diffusers scheduler instance, got {choice!r}.")
    return choice
