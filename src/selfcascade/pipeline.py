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
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from . import embedded_sd
from .backbones import Backbone, backbone_from_pipe
from .backbones.base import BANKS_DIR, MODEL_SETTINGS_FILE, PIVOT_SPACES
from .baselines import baseline_context, hires_fix
from .baselines.rivals import (FULL_SCHEDULE_RIVALS, RIVAL_PIVOT_SPACE, SINGLE_STAGE_RIVALS, rival_context, rival_plan,
                               rival_sampler)
from .cascade import CascadeResult, PivotSpace, StepCallback, after_step, resolve_k, sample_cascade
from .loading import SINGLE_FILE_SUFFIXES, is_single_file, load_single_file
from .modes import CASCADE_MODES, MODES, RIVAL_MODES, VIDEO_MODES
from .plan import DEFAULT_MAX_RATIO, ScalePlan, make_plan
from .schedulers import check_scheduler, make_scheduler
from .unet_features import tuned_stage_context
from .window_attention import windowed_final_stage
from .upsamplers import UpsamplerBank, bank_mismatches, load_bank

logger = logging.getLogger(__name__)

Mode = Literal["tuning-free", "direct", "tuned", "attn-sf", "redilate", "hires-fix", "hidiffusion", "demofusion",
               "freescale", "deep-shrink"]
#: Modes that sample the target in one pass, from noise.
SINGLE_STAGE_MODES = frozenset({"direct", "attn-sf", "redilate", *SINGLE_STAGE_RIVALS})
#: Images per UNet batch when the caller gives no batch_size: as many as fit this many output pixels (one
#: 2048x2048 image, four at 1024x1024), so a long --seeds list does not put every image in one batch.
DEFAULT_BATCH_PIXELS = 2048 * 2048
#: Latents ``callback_on_step_end`` can read and replace (diffusers' ``callback_on_step_end_tensor_inputs``).
CALLBACK_TENSOR_INPUTS = ("latents",)
#: diffusers' step-end callback: (pipeline, step index within the stage, timestep, tensors) -> tensors to replace.
StepEndCallback = Callable[[Any, int, torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
#: A bank, its folder or hub id; or one per stage r >= 1 (None: that stage runs tuning-free).
Upsamplers = UpsamplerBank | str | os.PathLike | Sequence["UpsamplerBank | str | os.PathLike | None"]
OutputType = Literal["pil", "np", "pt", "latent"]
#: Name under which the model the project trains and ships is loaded: the v3 tiny Stable Diffusion once its
#: weights are in the install (``embedded_sd.is_shipped``), else the v2 pixel-space model.
EMBEDDED_NAME = "embedded"
#: Names that load a pixel-space model shipped inside the package (v2 and its video sibling; "embedded-video" is
#: v3's video sibling once its weights are in the install, ``embedded_sd.SHIPPED_VIDEO_DIR``, and v2's until then).
EMBEDDED_NAMES = (EMBEDDED_NAME, "embedded-v2", "embedded-video", "embedded-video-v2")


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


def default_batch_size(height: int, width: int, num_frames: int | None = None) -> int:
    """Images (or clips) per UNet batch for a target of this size: see ``DEFAULT_BATCH_PIXELS``."""
    return max(1, DEFAULT_BATCH_PIXELS // (height * width * (num_frames or 1)))


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
    #: One per image; None where the caller's ``generator=`` drew the noise.
    seeds: list[int | None]
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

        ``scheduler``: "ddim" (the paper's sampler, built from the pipeline's scheduler config), another name of
        ``selfcascade.schedulers.SCHEDULER_NAMES`` ("euler-a", "dpm++-2m-karras", ...), "pipeline" (keep the
        pipeline's own), or a diffusers scheduler instance.
        """
        backbone = backbone_from_pipe(pipe, **kwargs)
        backbone.scheduler = make_scheduler(scheduler, pipe.scheduler)
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
        """Load a hub id, a local diffusers folder, a single-file checkpoint (``.safetensors``/``.ckpt``, with
        ``config=`` a diffusers folder of its architecture to stay offline), or a shipped model ("embedded",
        "embedded-video", or a folder of the v3 package layout that ``train-sd --ship`` writes). ``kwargs`` (e.g.
        ``vae=``) go to diffusers' loader.

        Hub ids go through diffusers' own ``DiffusionPipeline.from_pretrained`` (and its cache).
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        path = Path(name_or_path)
        shipped = {EMBEDDED_NAME: embedded_sd.SHIPPED_DIR, "embedded-video": embedded_sd.SHIPPED_VIDEO_DIR}
        v3_folder = shipped.get(str(name_or_path), path)
        if (embedded_sd.is_shipped(v3_folder) and embedded_sd.vae_dir(v3_folder) is not None
                and not (v3_folder / "model_index.json").is_file()
                and not (v3_folder / "selfcascade_model.json").is_file()):
            # the package's v3 parts or its video sibling (or a copy of that layout, e.g. a folder `--ship` wrote)
            pipe = embedded_sd.load_embedded_pipeline(v3_folder).to(device, dtype)
            cascade = cls.from_pipe(pipe, scheduler=scheduler)
            if v3_folder in shipped.values():
                cascade.backbone.name = str(name_or_path)
            return cascade
        if str(name_or_path) in EMBEDDED_NAMES or (path / "selfcascade_model.json").is_file():
            from .backbones.embedded import EmbeddedBackbone

            name = str(name_or_path)
            backbone = (EmbeddedBackbone.from_folder(shipped=name) if name in EMBEDDED_NAMES
                        else EmbeddedBackbone.from_folder(path))
            backbone.scheduler = make_scheduler(scheduler, backbone.scheduler)
            backbone.to(device, dtype)
            return cls(backbone)
        config = kwargs.pop("config", None)
        if is_single_file(path):
            pipe = load_single_file(path, config, dtype, **kwargs).to(device)
            return cls.from_pipe(pipe, scheduler=scheduler)
        if config is not None:
            raise ValueError(f"config= names the architecture of a single-file checkpoint; {name_or_path} is not one "
                             f"({', '.join(SINGLE_FILE_SUFFIXES)}).")
        if path.exists() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} has no model_index.json: point at a folder written by a diffusers pipeline's "
                "save_pretrained (or a hub id, or 'embedded')."
            )
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(name_or_path), dtype=dtype, **kwargs)
        pipe.to(device)
        return cls.from_pipe(pipe, scheduler=scheduler)

    def save_pretrained(self, folder: str | os.PathLike, upsamplers: Upsamplers | None = None, **kwargs: Any) -> Path:
        """Write the wrapped pipeline (diffusers' ``save_pretrained``, ``kwargs`` passed on), the cascade's sampling
        defaults (``selfcascade.json``) and its banks (``banks/<side>px-<scale>x/``: ``upsamplers`` and those the
        model came with), so that ``from_pretrained(folder)`` runs tuned mode with no ``upsamplers=``. The scheduler
        is not saved: pass ``scheduler=`` to ``from_pretrained`` again."""
        bb = self.backbone
        pipe = getattr(bb, "pipe", None)
        if pipe is None:
            raise ValueError(f"{bb.name} is not a diffusers pipeline; its folder is written by its trainer "
                             "(`selfcascade train-base --export DIR`).")
        folder = Path(folder)
        pipe.save_pretrained(folder, **kwargs)
        (folder / MODEL_SETTINGS_FILE).write_text(json.dumps(bb.model_settings(), indent=2))
        given = [] if upsamplers is None else (
            [upsamplers] if isinstance(upsamplers, (UpsamplerBank, str, os.PathLike)) else list(upsamplers))
        shipped = sorted((bb.model_dir / BANKS_DIR).glob("*/config.json")) if bb.model_dir is not None else []
        for source in [*[b for b in given if b is not None], *(c.parent for c in shipped)]:
            bank = load_bank(source)
            side = max(bank.config.train_size or [0])
            bank.save_pretrained(folder / BANKS_DIR / f"{side}px-{float(bank.config.scale):g}x", safe_serialization=True)
        return folder

    # ------------------------------------------------------------------------------ helpers
    def plan(self, height: int, width: int, mode: Mode = "tuning-free") -> ScalePlan:
        """The stage sizes a call with this target would use; the target takes any size the wrapped pipeline does,
        the stages before it round to the UNet's multiple (the rivals keep it for every stage)."""
        bb = self.backbone
        plan = make_plan(
            bb.base_size, height, width, multiple=bb.size_multiple,
            final_multiple=bb.size_multiple if mode in RIVAL_MODES else bb.final_multiple,
            max_ratio=self.max_ratio, single_stage=mode in SINGLE_STAGE_MODES, single_jump=mode == "hires-fix",
        )
        return rival_plan(mode, bb.base_size, height, width, bb.size_multiple) or plan

    def weights_fingerprint(self, height: int, width: int, mode: Mode = "tuning-free",
                            upsamplers: Upsamplers | None = None) -> str:
        """A short digest of the weights a call with these settings runs (the UNet, the VAE that decodes it, and
        tuned mode's banks) and of the model's sampling defaults (``selfcascade.json``: K, pivot space, guidance,
        scale cue), so caches of generated images never serve images of other weights or defaults. Every tensor is
        sampled sparsely: cheap for billion-parameter UNets, yet any training step (which moves nearly every weight)
        changes it."""
        modules = [self.backbone.unet]
        if getattr(self.backbone, "vae", None) is not None:  # another VAE (`--vae`, a fine-tuned decoder) decodes others
            modules.append(self.backbone.vae)
        if mode == "tuned":
            modules += [b for b in self._stage_banks(upsamplers, self.plan(height, width, mode)) if b is not None]
        digest = hashlib.sha1(json.dumps(self.backbone.model_settings(), sort_keys=True).encode())
        for module in modules:
            for name, tensor in module.state_dict().items():
                flat = tensor.detach().flatten()
                digest.update(name.encode())
                digest.update(flat[::max(1, flat.numel() // 256)].float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def check_inputs(
        self, prompt: Any, negative_prompt: Any, mode: str, num_inference_steps: int, num_images_per_prompt: int,
        pivot_space: str | None, output_type: str, num_frames: int | None = None, batch_size: int | None = None,
        prompt_options: dict[str, Any] | None = None, seed: Any = None, generator: Any = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
        cross_attention_kwargs: dict | None = None,
    ) -> list[str] | None:
        """Raise a ValueError naming the problem and the fix; return the prompts as a list (None: given as embeddings)."""
        options = prompt_options or {}
        if prompt is not None and options.get("prompt_embeds") is not None:
            raise ValueError("give prompt or prompt_embeds, not both.")
        if prompt is None and options.get("prompt_embeds") is None:
            raise ValueError("give a prompt (a string or a list of strings) or prompt_embeds.")
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt is not None and (not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        if (prompt is not None and negative_prompt is not None and not isinstance(negative_prompt, str)
                and len(negative_prompt) != len(prompt)):
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {len(prompt)} prompts; give one each or one string.")
        self._check_prompt_options(options)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}.")
        for name, value in (("num_inference_steps", num_inference_steps), ("num_images_per_prompt", num_images_per_prompt),
                            ("batch_size", 1 if batch_size is None else batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if pivot_space is not None and pivot_space not in PIVOT_SPACES:
            raise ValueError(f"pivot_space must be {' or '.join(map(repr, PIVOT_SPACES))}, got {pivot_space!r}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of pil, np, pt, latent, got {output_type!r}.")
        if seed is not None and generator is not None:
            raise ValueError("give seed (one generator per image and stage, made here) or generator, not both.")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSOR_INPUTS))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs can name {', '.join(CALLBACK_TENSOR_INPUTS)}; "
                             f"got {', '.join(unknown)}.")
        if cross_attention_kwargs is not None and rival_sampler(mode) is not None:
            raise ValueError(f"mode={mode!r} runs its own UNet passes, which take no cross_attention_kwargs; use "
                             "a cascade or direct mode with them.")
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

    def _check_prompt_options(self, options: dict[str, Any]) -> None:
        """Precomputed embeddings, clip_skip and LoRA scale go to diffusers' encode_prompt: only pipelines have one."""
        bb = self.backbone
        given = {k for k, v in options.items() if v is not None}
        unsupported = sorted(given - bb.prompt_options)
        if unsupported:
            raise ValueError(f"{bb.name} encodes prompts with its own text encoder and takes no {', '.join(unsupported)}; "
                             "pass prompt (and negative_prompt) instead.")
        if "prompt_embeds" in given and bb.zoom_cue:
            raise ValueError(f"{bb.name} adds a scale cue to the prompt of each stage, which prompt_embeds cannot carry; "
                             "pass prompt instead.")
        for embeds, pooled in (("prompt_embeds", "pooled_prompt_embeds"),
                               ("negative_prompt_embeds", "negative_pooled_prompt_embeds")):
            if pooled in bb.prompt_options and (embeds in given) != (pooled in given):
                raise ValueError(f"{bb.name} needs {embeds} and {pooled} together (both from the pipeline's encode_prompt).")

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

    def _check_banks(self, banks: Sequence[UpsamplerBank | None], plan: ScalePlan, k: int) -> None:
        """Warn, naming both sides, where a bank runs at another K, stage scale or size than it was tuned for."""
        for r, bank in enumerate(banks, start=1):
            if bank is None:
                continue
            (h0, w0), (h, w) = plan.stages[r - 1], plan.stages[r]
            for problem in bank_mismatches(bank, k=k, scale=h * w / (h0 * w0), size=(h, w)):
                logger.warning("upsampler bank %s at stage %d: %s; tune one for this call with `selfcascade "
                               "train-upsamplers` (or --init-from this bank) for the best results",
                               bank.config.get("_name_or_path", "in-memory"), r, problem)

    def _step_end(self, callback: StepCallback | None, callback_on_step_end: StepEndCallback | None,
                  tensor_inputs: Sequence[str]) -> StepCallback | None:
        """The sampler's callback: the old per-stage ``callback``, then diffusers' ``callback_on_step_end``."""
        if callback_on_step_end is None:
            return callback

        def step_end(stage: int, i: int, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
            latents = after_step(callback, stage, i, t, latents)
            self.current_stage = stage
            outputs = callback_on_step_end(self, i, t, {name: latents for name in tensor_inputs}) or {}
            return outputs.get("latents", latents)

        return step_end

    # -------------------------------------------------------------------------------- call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        generator: torch.Generator | list[torch.Generator] | None = None,
        batch_size: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_stages: bool = False,
        output_type: OutputType = "pil",
        callback: StepCallback | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
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
        ``pivot_space``: "latent" (the paper) or "pixel" (decode, bicubic resize, encode; the default of
        mode="hires-fix"); the cascade's default is the model's own (``selfcascade.json``), else "latent".
        ``strength`` (mode="hires-fix" only, default 0.55): the img2img strength; K = strength * T.
        ``seed`` gives image i the seed ``seed + i`` (or pass one seed per image), so any image can be
        regenerated alone. ``generator`` (instead of seed, as in diffusers): one ``torch.Generator`` for the batch
        or one per image, drawing every stage's noise in turn.
        ``batch_size``: images per UNet batch (default: ``default_batch_size`` of the target); with seeds, the
        images do not depend on it.
        ``prompt_embeds``, ``negative_prompt_embeds`` (SDXL: and the pooled ones), ``clip_skip`` and
        ``cross_attention_kwargs`` (e.g. ``{"scale": 0.7}`` for a loaded LoRA) work as in diffusers' pipelines.
        ``callback_on_step_end(pipe, i, t, {"latents": ...})`` runs after every step of every stage (``i`` counts
        within the stage, ``pipe.current_stage`` names it); latents it returns replace the sampler's.
        ``upsamplers`` (mode="tuned"): a tuned feature-upsampler bank, its folder or hub id, or one per
        stage after the first; a bank shaped for another model raises a ValueError, one tuned for another K,
        scale or size logs a warning.
        ``image``: upscale this instead of sampling stage 0: [B, 3, H, W] (video: [B, 3, F, H, W]) in [0, 1] at
        the plan's first size (the model's base size), one per prompt and image.
        ``window_attention``: the cascade's final stage runs its top-level self-attention in shifted 2x2 windows
        (HiDiffusion's MSW-MSA; ``selfcascade.window_attention``).
        """
        bb = self.backbone
        # 1. check inputs and resolve defaults
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_options = {k: v for k, v in dict(
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            clip_skip=clip_skip, lora_scale=lora_scale).items() if v is not None}
        prompts = self.check_inputs(prompt, negative_prompt, mode, num_inference_steps, num_images_per_prompt,
                                    pivot_space, output_type, num_frames, batch_size, prompt_options, seed, generator,
                                    callback_on_step_end_tensor_inputs, cross_attention_kwargs)
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
            pivot_space = pivot_space or RIVAL_PIVOT_SPACE.get(
                mode, bb.pivot_space if mode in CASCADE_MODES else "latent")
        guidance = (bb.stage_guidance(plan.num_stages) if guidance_scale is None
                    else self._guidance(guidance_scale, plan.num_stages))
        num_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        batch = num_prompts * num_images_per_prompt
        chunk = batch_size or default_batch_size(height, width, num_frames)
        negatives = [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
        if upsamplers is not None and mode != "tuned":
            raise ValueError(f"upsamplers only apply to mode='tuned', got mode={mode!r}.")
        banks = self._stage_banks(upsamplers, plan) if mode == "tuned" else None
        if banks is not None:
            self._check_banks(banks, plan, k)
        if window_attention and (mode not in CASCADE_MODES or plan.num_stages < 2):
            raise ValueError("window_attention windows the final stage of a cascade: use mode='tuning-free' or "
                             f"'tuned' with a target above the base size, not mode={mode!r} at {height}x{width}.")

        # 2. encode the prompt once for all stages (and once per zoom for a model trained with a scale cue)
        do_cfg = any(g > 1.0 for g in guidance)
        embeds = bb.encode_prompt(prompts, negatives, num_images_per_prompt, do_cfg, **prompt_options)
        for h, w in plan.stages:
            zoom = bb.stage_zoom(h, w)
            if zoom > 1 and zoom not in embeds.zoomed:
                embeds.zoomed[zoom] = bb.encode_prompt(bb.stage_prompts(prompts, h, w), negatives,
                                                       num_images_per_prompt, do_cfg)

        # 3. one generator per image per stage, or the caller's for every stage
        if generator is None:
            seeds: list[int | None] = list(self._seeds(seed, batch))
            gen_device = "cpu" if bb.device.type == "mps" else bb.device
            generators: list[Any] = [[torch.Generator(gen_device).manual_seed(stage_seed(s, r)) for s in seeds]
                                     for r in range(plan.num_stages)]
        else:
            if isinstance(generator, list) and len(generator) != batch:
                raise ValueError(f"got {len(generator)} generators for {batch} images; give one per image or one.")
            seeds = [None] * batch
            generators = [generator] * plan.num_stages
        first = generator[0] if isinstance(generator, list) else generator
        rival_seed = seeds[0] if first is None else first.initial_seed()

        start = None
        if image is not None:
            if mode in SINGLE_STAGE_MODES:
                raise ValueError(f"image= is upscaled by the later stages of a cascade; mode={mode!r} has none.")
            if mode in RIVAL_MODES:
                raise ValueError(f"image= is upscaled by the cascade's own stages; mode={mode!r} does not take it.")
            start = bb.encode(image.to(bb.device, torch.float32))

        # 4. sample every stage, ``chunk`` images at a time (attn-sf, redilate, hidiffusion and deep-shrink alter the
        #    UNet for this call only; demofusion and freescale bring their own step loop)
        stage_context = tuned_stage_context(bb.unet, banks) if banks is not None else None
        if window_attention:
            stage_context = windowed_final_stage(bb.unet, plan.num_stages, stage_context)
        sampler = rival_sampler(mode) or sample_cascade
        step_callback = self._step_end(callback, callback_on_step_end, callback_on_step_end_tensor_inputs)
        unet_kwargs = {"cross_attention_kwargs": cross_attention_kwargs} if cross_attention_kwargs else None
        results: list[CascadeResult] = []
        with baseline_context(mode, bb.unet, plan, num_train_timesteps), rival_context(mode, bb, num_inference_steps, rival_seed):
            for lo in range(0, batch, chunk):
                rows = slice(lo, lo + chunk)
                results.append(sampler(
                    bb, plan, embeds.select(rows), [g[rows] if isinstance(g, list) else g for g in generators],
                    num_inference_steps=num_inference_steps, k=k, guidance_scales=guidance, pivot_space=pivot_space,
                    callback=step_callback, progress=progress, stage_context=stage_context, num_frames=num_frames,
                    start_latents=None if start is None else start[rows], unet_kwargs=unet_kwargs,
                ))
        stage_latents = [torch.cat(parts) for parts in zip(*(result.stage_latents for result in results))]

        # 5. decode, ``chunk`` images at a time
        wanted = stage_latents if return_stages else stage_latents[-1:]
        decoded = []
        for (h, w), latents in zip(plan.stages[-len(wanted):], wanted):
            if output_type == "latent":
                decoded.append(latents)
                continue
            with torch.no_grad(), bb.decode_context(h, w, min(chunk, batch)):
                images = torch.cat([bb.decode(part) for part in latents.split(chunk)])
            decoded.append(_to_output(images, output_type))
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
        for name, value in (("clip_skip", clip_skip), ("cross_attention_kwargs", cross_attention_kwargs)):
            if value is not None:
                settings[name] = value
        return CascadeOutput(images=decoded[-1], plan=plan, seeds=seeds, settings=settings,
                             stages=decoded if return_stages else [])

