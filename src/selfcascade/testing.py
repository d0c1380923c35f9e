"""Tiny random-weight diffusers pipelines, built entirely offline, for tests, benchmarks and demos.

These mirror the dummy components of diffusers' own fast tests
(``tests/pipelines/stable_diffusion*/test_*.py::get_dummy_components``) but need no
``hf-internal-testing`` files from the hub: the CLIP tokenizer is a byte-level BPE whose
``vocab.json``/``merges.txt`` are written here into a temporary folder.

Sizes (all builders):
- VAE: 2 levels, ``vae_scale_factor`` = 2, 4 latent channels.
- UNet: 2 levels (one downsampling), ``sample_size`` = 16 latents, so the native image is
  ``BASE_PX`` = 32x32 pixels and every side must be a multiple of ``SIZE_MULTIPLE`` = 4 pixels
  (``vae_scale_factor * 2 ** (num_down_blocks - 1)``).
- Text: CLIP text transformer, hidden 32, 2 layers, 4 heads, 77 tokens, vocab ``TINY_VOCAB_SIZE``.
- Video (``make_tiny_video``): the same VAE and text encoder around a 2-level ``UNet3DConditionModel``
  with ``sample_size`` = 8 latents (native ``VIDEO_BASE_PX`` = 16 px, sides a multiple of 4), so a
  few frames at 2x-4x the base size sample in well under a second on a CPU.

Every module is built right after ``torch.manual_seed(seed)``, so the same seed gives the same
weights in every process.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "BASE_PX",
    "SIZE_MULTIPLE",
    "TINY_VOCAB_SIZE",
    "make_tiny_tokenizer",
    "make_tiny_sd",
    "make_tiny_sd15",
    "make_tiny_sdxl",
    "make_tiny_video",
    "VIDEO_BASE_PX",
    "save_tiny_sd",
]

BASE_PX = 32  # native image side of the tiny image pipelines, in pixels
VIDEO_BASE_PX = 16  # native frame side of the tiny video pipeline, in pixels
SD15_BASE_PX = 32  # native image side of the SD-1.5-shaped tiny pipeline (16x16 latents), in pixels
LATENT_PX = 16  # UNet sample_size (latent side)
SIZE_MULTIPLE = 4  # every image side must be a multiple of this (vae 2 x one UNet downsampling)
TEXT_HIDDEN = 32  # CLIP hidden size (= SD cross_attention_dim)
MAX_TOKENS = 77  # tokenizer.model_max_length = text encoder max_position_embeddings

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# A handful of merges so the merges file is exercised (the rest stays character-level).
_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("r", "e"),
    ("re", "d</w>"),
    ("p", "p"),
    ("a", "pp"),
    ("l", "e</w>"),
    ("app", "le</w>"),
]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that GPT-2/CLIP byte-level BPE uses, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tiny_vocab() -> dict[str, int]:
    """CLIP's vocab layout, shrunk: byte chars, byte chars + '</w>', merges, then the two specials."""
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


TINY_VOCAB_SIZE = len(_tiny_vocab())  # 524
BOS_ID = TINY_VOCAB_SIZE - 2
EOS_ID = TINY_VOCAB_SIZE - 1


def make_tiny_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIP tokenizer over a ~500-entry byte-level BPE vocab (any text tokenizes, mostly per character).

    Mirrors ``hf-internal-testing/tiny-random-clip``'s tokenizer: same special tokens and
    ``model_max_length`` 77. SD 1.x pads with ``<|endoftext|>``; SD 2.x / SDXL's second tokenizer pad
    with ``"!"`` (pass ``pad_token="!"``).
    """
    with tempfile.TemporaryDirectory(prefix="tiny_clip_tok_") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "vocab.json").write_text(json.dumps(_tiny_vocab(), ensure_ascii=False), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _MERGES)
        (tmp_path / "merges.txt").write_text(merges, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS, pad_token=pad_token)


def _text_config(**extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
        **extra,
    )


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        sample_size=BASE_PX,
    )


def _sd_scheduler(prediction_type: str) -> DDIMScheduler:
    # Stable Diffusion 1.x/2.x's scheduler_config.json, as DDIM.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def make_tiny_sd(prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """Tiny random Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``), native 32x32 px.

    Mirrors diffusers' ``StableDiffusionPipelineFastTests.get_dummy_components`` (UNet
    block_out_channels (32, 64), cross_attention_dim 32, tiny KL-VAE, tiny CLIPTextModel) with
    cross-attention at *both* levels, as SD 1.x/2.x have attention at their highest resolution
    (the source of duplicated objects at large sizes). ``prediction_type="v_prediction"`` gives an
    SD 2.x-768-like model. Scheduler: DDIM with SD's training schedule. No safety checker.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_PX,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(2, 4),  # = number of heads per level (diffusers' legacy naming)
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    tokenizer = make_tiny_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def make_tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    """Tiny random pipeline with Stable Diffusion 1.5's UNet layout (module names), native ``SD15_BASE_PX`` px.

    SD 1.5's topology (three cross-attention levels and a plain one, two layers per block, a cross-attention
    mid block) at widths (32, 64, 96, 96), so tools that recognise SD 1.5 by its UNet's module names
    (HiDiffusion) run on it. Sides must be a multiple of 16 px (VAE 2 x three downsamplings).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SD15_BASE_PX // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96, 96),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(), unet=unet,
        scheduler=_sd_scheduler("epsilon"), safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def make_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """Tiny random SDXL (``StableDiffusionXLPipeline``), native 32x32 px.

    Mirrors diffusers' ``StableDiffusionXLPipelineFastTests.get_dummy_components``: two text
    encoders (``CLIPTextModel`` and ``CLIPTextModelWithProjection``, hidden 32 each, so the UNet's
    cross_attention_dim is their concatenation, 64), UNet with ``addition_embed_type="text_time"``,
    ``addition_time_embed_dim=8`` and ``projection_class_embeddings_input_dim = 6 * 8 + 32`` (six
    size/crop micro-conditions plus the pooled text embedding), linear projections, and no
    attention at the highest level (as SDXL). Scheduler: DDIM with SDXL's training schedule
    (SDXL itself ships Euler). No watermarker.
    """
    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=LATENT_PX,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=32,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    torch.manual_seed(seed)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection_dim=TEXT_HIDDEN))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=make_tiny_tokenizer(),
        tokenizer_2=make_tiny_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=_sd_scheduler("epsilon"),
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def make_tiny_video(seed: int = 0) -> TextToVideoSDPipeline:
    """Tiny random text-to-video model (``TextToVideoSDPipeline``, ``UNet3DConditionModel``), native 16x16 px.

    Laid out as ModelScope T2V (cross-attention at the highest level, none at the lowest; temporal
    convolutions and attention in every block), shrunk as diffusers' ``TextToVideoSDPipelineFastTests``
    shrink it, with the tiny VAE and CLIP text encoder of ``make_tiny_sd``. Scheduler: DDIM with SD's
    training schedule (ModelScope's own).
    """
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=VIDEO_BASE_PX // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = _tiny_vae(seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=make_tiny_tokenizer(), unet=unet,
                                 scheduler=_sd_scheduler("epsilon"))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def save_tiny_sd(path, prediction_type: str = "epsilon", seed: int = 0, pipe: StableDiffusionPipeline | None = None) -> Path:
    """Save a tiny SD pipeline folder (``save_pretrained``, safetensors) at ``path``; returns the path.

    Loads back with ``StableDiffusionPipeline.from_pretrained(path)`` (and
    ``safety_checker=None`` is remembered in model_index.json). Pass ``pipe`` to save an existing one.
    """
    path = Path(path)
    if pipe is None:
        pipe = make_tiny_sd(prediction_type=prediction_type, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
