"""The v3 embedded model's parts as a stock Stable Diffusion folder.

v3 is a tiny Stable Diffusion: SD 1.5's UNet block topology and module names at small widths, an SD-layout
VAE (``train_vae``), SD's scaled-linear schedule, and all-MiniLM-L6-v2 as ``text_encoder``/``tokenizer``.
Written as a diffusers pipeline folder, ``StableDiffusionPipeline.from_pretrained(folder)`` and
``DiffusionPipeline.from_pretrained(folder)`` load it offline with no extra arguments, so every tool
written for SD (diffusers' own pipelines, HiDiffusion, LoRA loading, tiled VAE decoding) runs on it.

Prompts are encoded exactly as the stock pipeline does: padded to ``max_length`` tokens
(``tokenizer.model_max_length``), MiniLM run with its attention mask (``use_attention_mask`` in its
config, which ``encode_prompt`` reads), and the UNet cross-attends to all padded positions, as SD's
does; ``encode_prompts`` below is that same computation for training.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .backbones.base import BANKS_DIR, MODEL_SETTINGS_FILE
from .io import atomic_dir, atomic_path
from .text_encoder import DEFAULT_MAX_LENGTH, HIDDEN_SIZE, _model_path
from .training import write_train_summary

logger = logging.getLogger(__name__)

#: Where the shipped v3 parts live inside the package: ``unet/``, ``vae/``, ``scheduler/``, ``selfcascade.json``
#: (sampling defaults and the scale cue) and ``banks/``; the text encoder comes from the MiniLM package.
SHIPPED_DIR = Path(__file__).resolve().parent / "embedded_v3"

#: Where the v3 video sibling ships (``train-sd-video --ship``): ``unet/`` (a ``UNet3DConditionModel``), ``scheduler/``,
#: ``selfcascade.json``, ``train_state.json`` and ``banks/``; it decodes each frame with the image model's VAE, the
#: ``vae/`` of the folder around it.
SHIPPED_VIDEO_DIR = SHIPPED_DIR / "video"

#: Base size in pixels (16x16 latents through the 8x VAE).
BASE_SIZE = 128
#: The scale cue: words after the prompt that say the canvas shows its object ``zoom`` times larger than a
#: base-size image does. Training labels zoomed windows with it; a cascade stage (or a user of a stock
#: pipeline) adds it to the prompt, so the cue needs nothing a stock SD pipeline lacks.
ZOOM_CUE = "{prompt}, {zoom}x zoom"
#: Sampling defaults written beside the weights (``selfcascade.json``, see ``Backbone.use_model_folder``): the
#: paper's K=700 (the schedule is SD's) and SD's guidance; the scale cue is added for models trained with one.
DEFAULT_SAMPLING: dict = {"K": 700, "guidance_scale": 7.5}


#: SD 1.5's topology: three cross-attention down blocks and a plain one, two layers each, mid attention.
SD15_UNET: dict = {
    "sample_size": BASE_SIZE // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": HIDDEN_SIZE,
    "norm_num_groups": 32,
}
#: SD's noise schedule, so K=700 means what it means in the paper.
SD_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_sd_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**{**SD15_UNET, **(config or {})})


def build_sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SD_SCHEDULE, "prediction_type": prediction_type})


def load_text_components(max_length: int = DEFAULT_MAX_LENGTH):
    """(tokenizer, text_encoder) of MiniLM, set up so the stock pipeline encodes prompts as training does."""
    from transformers import AutoTokenizer, BertModel

    path = _model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, model_max_length=max_length)
    encoder = BertModel.from_pretrained(path, local_files_only=True)
    encoder.config.use_attention_mask = True
    return tokenizer, encoder.eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """[B, max_length, 384]: what ``StableDiffusionPipeline.encode_prompt`` computes for these prompts."""
    tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors="pt")
    device = text_encoder.device
    return text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]


def is_shipped(folder: Path | None = None) -> bool:
    """Whether the v3 model's trained UNet is in this install (until it is, "embedded" is the v2 model)."""
    return ((folder or SHIPPED_DIR) / "unet" / "config.json").is_file()


def vae_dir(folder: Path) -> Path | None:
    """The VAE of a folder of the v3 package layout: its own ``vae/``, or for the video sibling (which has none)
    the ``vae/`` of the image model's folder around it; None if neither exists."""
    return next((d for d in (folder / "vae", folder.parent / "vae") if (d / "config.json").is_file()), None)


def is_video_unet(folder: Path) -> bool:
    """Whether ``folder/unet`` holds the video sibling's ``UNet3DConditionModel``."""
    return json.loads((folder / "unet" / "config.json").read_text()).get("_class_name") == "UNet3DConditionModel"


def load_embedded_pipeline(folder: Path | str | None = None, max_length: int = DEFAULT_MAX_LENGTH):
    """A stock ``StableDiffusionPipeline`` of the shipped parts (default: the package's), or a
    ``TextToVideoSDPipeline`` for the video sibling's folder, with MiniLM (from its installed package)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, TextToVideoSDPipeline,
                           UNet2DConditionModel, UNet3DConditionModel)

    folder = Path(folder or SHIPPED_DIR)
    if not is_shipped(folder) or vae_dir(folder) is None:
        raise FileNotFoundError(f"{folder} lacks unet/ or a vae/: the v3 embedded model is not in this install; train "
                                "it with `selfcascade train-sd` and export it with `selfcascade export-embedded`.")
    tokenizer, text_encoder = load_text_components(max_length)
    video = is_video_unet(folder)
    # Shipped weights are fp16 (half the size); compute starts in fp32 and the caller's .to() picks the dtype.
    unet = (UNet3DConditionModel if video else UNet2DConditionModel).from_pretrained(folder / "unet",
                                                                                      torch_dtype=torch.float32)
    parts = {"vae": AutoencoderKL.from_pretrained(vae_dir(folder), torch_dtype=torch.float32),
             "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
             "scheduler": DDIMScheduler.from_pretrained(folder / "scheduler")}
    pipe = (TextToVideoSDPipeline(**parts) if video else
            StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    pipe.register_to_config(_name_or_path=str(folder))
    return pipe


def folder_sampling(folder: Path) -> dict:
    """A model folder's sampling defaults (its ``selfcascade.json``), else SD's (``DEFAULT_SAMPLING``)."""
    settings_file = folder / MODEL_SETTINGS_FILE
    return json.loads(settings_file.read_text()) if settings_file.is_file() else dict(DEFAULT_SAMPLING)


def ship_parts(folder: Path, unet, scheduler, sampling: dict, state: dict) -> Path:
    """A training run's parts into a folder of the package layout, each swapped in atomically: the UNet in fp16
    (half the size), its scheduler, the sampling defaults (values the folder's ``selfcascade.json`` already holds,
    chosen by measurement, win over ``sampling``) and ``train_state.json``."""
    settings_file = folder / MODEL_SETTINGS_FILE
    sampling = {**sampling, **(json.loads(settings_file.read_text()) if settings_file.is_file() else {})}
    with atomic_dir(folder / "unet") as tmp:
        unet.half().save_pretrained(tmp, safe_serialization=True)
    with atomic_dir(folder / "scheduler") as tmp:
        scheduler.save_pretrained(tmp)
    with atomic_path(settings_file) as tmp:
        tmp.write_text(json.dumps(sampling, indent=1) + "\n")
    write_train_summary(folder, state)
    return folder


def save_sd_folder(folder: Path | str, unet, vae, max_length: int = DEFAULT_MAX_LENGTH, scheduler=None,
                   train_state: dict | None = None, sampling: dict | None = None, banks: Path | None = None) -> Path:
    """Write a stock ``StableDiffusionPipeline`` folder (no safety checker, no feature extractor), or for a
    ``UNet3DConditionModel`` (the video sibling) a ``TextToVideoSDPipeline`` one, atomically; ``train_state`` (a
    training run's checkpoint state) adds its ``train_state.json``, ``sampling`` the ``selfcascade.json`` of
    sampling defaults, ``banks`` a copy of a folder of upsampler banks."""
    from diffusers import StableDiffusionPipeline, TextToVideoSDPipeline, UNet3DConditionModel

    tokenizer, text_encoder = load_text_components(max_length)
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet,
             "scheduler": scheduler or build_sd_scheduler()}
    if isinstance(unet, UNet3DConditionModel):
        pipe = TextToVideoSDPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    with atomic_dir(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if train_state is not None:
            write_train_summary(tmp, train_state)
        if sampling is not None:
            (tmp / MODEL_SETTINGS_FILE).write_text(json.dumps(sampling, indent=1) + "\n")
        if banks is not None and banks.is_dir():
            shutil.copytree(banks, tmp / BANKS_DIR)
    logger.info("wrote a %s folder to %s", type(pipe).__name__, folder)
    return Path(folder)
