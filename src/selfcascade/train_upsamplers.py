"""Tune a feature-upsampler bank on high-res images (paper Algorithm 1); the base model stays frozen.

    selfcascade train-upsamplers --model embedded --scale 4 --size 64 --max-steps 2000
    selfcascade train-upsamplers --model DIR_OR_HUB_ID --data IMAGES_DIR --scale 4 --output bank/
    selfcascade train-upsamplers --model VIDEO_MODEL --data CLIPS_DIR --frames 8 --size 64

A text-to-video model (UNet3D) tunes on clips: a folder of .gif/.mp4 files or of sub-folders of PNG frames
(NAME.txt caption beside each; ``selfcascade data clips`` makes emoji motion clips). The bank works per
frame, as in sampling; the first ``--frames`` frames of each clip are used.

Each step takes pairs (x at the high-res size, downsample(x) at the pivot size), draws t ~ U{1..K}
and minimises ||target - eps~(z_t, t, c, z_0^{r-1})||^2 (target: eps, or v for v-prediction models)
over the bank's weights only. Everything the frozen model computes from an image and its caption alone
(the high-res latents, the text conditioning and the pivot's skip features) is computed once and kept
in memory up to ``--cache-gb``, so a step costs one UNet forward and backward at the high-res size.

Runs unchanged on one CPU, one GPU or many (``accelerate launch``): mixed precision on GPU,
checkpoints of safetensors + json (``RUN_DIR/checkpoint``, resumed automatically), a progress bar with
the loss, a tuning-free vs tuned validation grid every ``--validate-every`` steps and, with
``--snapshot-every``, copies of the bank along the way. ``--init-from BANK``
starts from a bank tuned for another scale ("extendable tuning").
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
from tqdm.auto import tqdm

from .backbones.base import Backbone, PromptEmbeds, resize_spatial
from .cascade import resolve_k
from .checkpoints import deadline_after, find_checkpoint, load_optimizer, read_checkpoint_state
from .commands import add_command, add_time_limit_argument, add_trainer_arguments, parse_positive_int, run_module
from .data.emoji_clips import DEFAULT_FRAMES
from .training import LoopConfig, check_resume, train_loop
from .unet_features import inject, pivot_features
from .upsamplers import DEFAULT_TIME_WIDTH, DEFAULT_WIDTH, UpsamplerBank

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
#: Clip files; a clip may also be a sub-folder of image frames (in name order) with NAME.txt beside it.
CLIP_SUFFIXES = (".gif", ".mp4")
CLIP_LAYOUT = ("a folder of .gif/.mp4 clips or of sub-folders of PNG frames, each with a NAME.txt caption beside "
               "it (`selfcascade data clips` makes emoji motion clips)")


# --------------------------------------------------------------------------------------------------
# Data


class ImageFiles:
    """Image files read, squared and resized when a batch asks for them: uint8 [n, 3, S, S] for a list of indices.

    Held whole in memory a large set at a large size does not fit (the emoji train split is 38 GB at 1024 px), and
    the pivot cache keeps what the frozen model computes from each image anyway.
    """

    ndim = 4

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __getitem__(self, index: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
        indices = torch.as_tensor(index).reshape(-1).tolist()
        arrays = np.stack([_square(Image.open(self.paths[i]), self.size) for i in indices])
        images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
        return images[0] if isinstance(index, int) else images


@dataclass
class ImageCaptions:
    """High-res training images (uint8 [N, 3, S, S], RGB, in memory or read on demand) or clips (uint8
    [N, 3, F, S, S]), one caption each."""

    images: torch.Tensor | ImageFiles
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def num_frames(self) -> int | None:
        """Frames per clip; None for images."""
        return self.images.shape[2] if self.images.ndim == 5 else None


def _square(image: Image.Image, size: int) -> np.ndarray:
    """Centre crop to a square, then an antialiased resize to ``size``."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.convert("RGB").crop((left, top, left + side, top + side))
    return np.asarray(image.resize((size, size), Image.BICUBIC, reducing_gap=None))


def _captions(paths: Sequence[Path], kind: str) -> list[str]:
    """The NAME.txt beside each file or folder NAME(.ext); missing ones give the empty prompt, with a warning."""
    captions, uncaptioned = [], 0
    for path in paths:
        text = path.parent / f"{path.stem if path.is_file() else path.name}.txt"
        uncaptioned += not text.is_file()
        captions.append(text.read_text(encoding="utf-8").strip() if text.is_file() else "")
    if uncaptioned:
        logger.warning("%d of %d %s have no caption file (NAME.txt beside NAME); they train with the empty prompt",
                       uncaptioned, len(paths), kind)
    return captions


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_clips(folder: Path) -> list[Path]:
    """Clips under ``folder``: .gif/.mp4 files, and sub-folders of image frames with a NAME.txt beside the folder.

    The caption beside the folder is what tells a clip's frames from a sub-folder of separate images.
    """
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CLIP_SUFFIXES]
    frame_dirs = {p.parent for p in _image_files(folder)
                  if p.parent != folder and (p.parent.parent / f"{p.parent.name}.txt").is_file()}
    return sorted([*files, *frame_dirs])


def load_image_folder(folder: Path, size: int) -> ImageCaptions:
    """Every image under ``folder`` (clips' frames aside), each captioned by the NAME.txt beside it."""
    clips = find_clips(folder)
    files = [p for p in _image_files(folder) if p.parent not in clips]
    if not files and clips:
        raise ValueError(f"--data {folder} holds video clips ({len(clips)}, e.g. {clips[0].name}) and no images: an "
                         "image model tunes on images with NAME.txt captions beside them; give a text-to-video "
                         "--model to tune on these clips.")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    if clips:
        logger.warning("ignoring %d clips under %s: an image model tunes on its %d images", len(clips), folder,
                       len(files))
    return ImageCaptions(ImageFiles(files, size), _captions(files, "images"))


def read_clip_frames(path: Path, frames: int) -> list[Image.Image]:
    """Up to the first ``frames`` frames of a .gif, an .mp4 (needs imageio) or a folder of image frames."""
    path = Path(path)
    if path.is_dir():
        return [Image.open(p) for p in sorted(q for q in path.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)[:frames]]
    if path.suffix.lower() == ".gif":
        with Image.open(path) as gif:
            return [frame.convert("RGB") for _, frame in zip(range(frames), ImageSequence.Iterator(gif))]
    from .io import _imageio

    with _imageio().get_reader(path, format="FFMPEG") as reader:
        return [Image.fromarray(frame) for _, frame in zip(range(frames), reader)]


def load_clip_folder(folder: Path, size: int, frames: int) -> ImageCaptions:
    """The first ``frames`` frames of every clip under ``folder`` (see ``find_clips``), each frame centre-cropped
    and resized to ``size``; clips with fewer frames are skipped (counted in a warning)."""
    clips = find_clips(folder)
    if not clips:
        if _image_files(folder):
            raise ValueError(f"--data {folder} holds images, not clips: a text-to-video model tunes on {CLIP_LAYOUT}.")
        raise FileNotFoundError(f"no clips under {folder}: give {CLIP_LAYOUT}.")
    kept, arrays = [], []
    for path in tqdm(clips, desc="loading clips", mininterval=2):
        clip = read_clip_frames(path, frames)
        if len(clip) == frames:
            kept.append(path)
            arrays.append(np.stack([_square(frame, size) for frame in clip]))
    if len(kept) < len(clips):
        logger.warning("%d of %d clips under %s have fewer than --frames %d frames and are skipped",
                       len(clips) - len(kept), len(clips), folder, frames)
    if not kept:
        raise ValueError(f"every clip under {folder} has fewer than --frames {frames} frames; lower --frames.")
    clips_uint8 = torch.from_numpy(np.stack(arrays)).permute(0, 4, 1, 2, 3).contiguous()  # [N, 3, F, S, S]
    return ImageCaptions(clips_uint8, _captions(kept, "clips"))


def load_manifest(cache_dir: Path, size: int, split: str = "train") -> ImageCaptions:
    """The embedded emoji data set's ``split`` at ``size`` px (rendered from SVG: true high-res ground truth)."""
    from .data.emoji import image_path, read_manifest
    from .data.loader import check_images

    records = [r for r in read_manifest(cache_dir) if r["split"] == split]
    if not records:
        raise ValueError(f"no {split!r} records in the manifest under {cache_dir}")
    check_images(cache_dir, records, size)  # a missing rendering fails here, not mid-run
    return ImageCaptions(ImageFiles([image_path(cache_dir, size, r["id"]) for r in records], size),
                         [r["caption"] for r in records])


def load_data(data: Path | None, size: int, split: str = "train", frames: int | None = None) -> ImageCaptions:
    """A data set manifest (its folder or the manifest file; default: the emoji cache) or an image folder;
    with ``frames`` (video models) a clip folder (default: the emoji motion clips of ``split`` at ``size``)."""
    from .data.emoji import MANIFEST, default_cache_dir

    if frames is not None and data is None:
        from .data.emoji_clips import clips_dir

        data = clips_dir(default_cache_dir(), size, split)
        if not data.is_dir():
            raise FileNotFoundError(f"no emoji motion clips at {size} px in {data}: make them with `selfcascade data "
                                    f"clips --sizes {size} --count 300`, or pass --data with {CLIP_LAYOUT}.")
    path = Path(data) if data is not None else default_cache_dir()
    if path.name == MANIFEST:
        path = path.parent
    if (path / MANIFEST).is_file():
        if frames is not None:
            raise ValueError(f"--data {path} is an image data set: a text-to-video model tunes on {CLIP_LAYOUT}.")
        return load_manifest(path, size, split)
    if frames is not None:
        return load_clip_folder(path, size, frames)
    if not path.is_dir():
        raise FileNotFoundError(f"--data {path} is neither a folder of images nor a data set with a {MANIFEST}")
    return load_image_folder(path, size)


# --------------------------------------------------------------------------------------------------
# What the frozen model gives once per image


def _split_embeds(embeds: PromptEmbeds) -> list[dict[str, torch.Tensor]]:
    rows = []
    for i in range(embeds.batch_size):
        row = {"embeds": embeds.embeds[i]}
        if embeds.mask is not None:
            row["mask"] = embeds.mask[i]
        row.update({f"extra.{k}": v[i] for k, v in embeds.extra.items()})
        rows.append(row)
    return rows


def _stack_embeds(rows: Sequence[dict[str, torch.Tensor]], device: torch.device) -> PromptEmbeds:
    stacked = {k: torch.stack([r[k] for r in rows]).to(device) for k in rows[0]}
    extra = {k.split(".", 1)[1]: v for k, v in stacked.items() if k.startswith("extra.")}
    return PromptEmbeds(embeds=stacked["embeds"], mask=stacked.get("mask"), extra=extra)


class PivotCache:
    """Per (image or clip, caption dropped?) high-res latents, text conditioning and pivot skip features.

    They depend only on the image and its caption, so they are computed once (in batches, on the
    training device) and kept on the CPU until ``max_bytes``; past that, items are recomputed.
    A video UNet folds frames into its batch, so a clip's pivot features are its F rows, kept together:
    a batch of B clips gets the B*F rows in the order the UNet makes them.
    """

    def __init__(self, backbone: Backbone, data: ImageCaptions, low_size: int, max_bytes: float = 4 * 2**30,
                 encode_batch: int = 8) -> None:
        self.backbone = backbone
        self.encode_batch = encode_batch
        self.data = data
        self.low_size = low_size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.items: dict[tuple[int, bool], dict] = {}

    @torch.no_grad()
    def _compute(self, keys: list[tuple[int, bool]]) -> list[dict]:
        bb = self.backbone
        images = self.data.images[[i for i, _ in keys]].to(bb.device).float() / 255
        low = resize_spatial(images, (self.low_size, self.low_size), "bicubic", antialias=True).clamp(0, 1)
        captions = ["" if dropped else self.data.captions[i] for i, dropped in keys]
        # each pass reads the captions as the cascade's stage of its size does (with its scale cue, if any)
        low_embeds = bb.encode_prompt(bb.stage_prompts(captions, self.low_size, self.low_size), None, 1, do_cfg=False)
        embeds = bb.encode_prompt(bb.stage_prompts(captions, *images.shape[-2:]), None, 1, do_cfg=False)
        z_low = self._encode(low)
        inputs = bb.unet_inputs(low_embeds, self.low_size, self.low_size, do_cfg=False)
        features = pivot_features(bb.unet, z_low, inputs, do_cfg=False)
        z_high = self._encode(images)
        rows = features[0].shape[0] // len(keys)  # 1 per image, F per clip
        return [{"z": z_high[j].cpu(), "text": {k: v.cpu() for k, v in row.items()},
                 "features": [f[j * rows:(j + 1) * rows].cpu() for f in features]}
                for j, row in enumerate(_split_embeds(embeds))]

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """VAE-encode ``encode_batch`` images at a time, tiled and sliced as decoding at that size is."""
        with self.backbone.decode_context(*images.shape[-2:], min(len(images), self.encode_batch)):
            return torch.cat([self.backbone.encode(chunk) for chunk in images.split(self.encode_batch)])

    def batch(self, indices: Sequence[int], dropped: Sequence[bool]) -> tuple[torch.Tensor, PromptEmbeds, list[torch.Tensor]]:
        """(high-res latents, text conditioning, pivot features per level) of a batch, on the device."""
        keys = [(int(i), bool(d)) for i, d in zip(indices, dropped)]
        missing = list(dict.fromkeys(k for k in keys if k not in self.items))
        fresh = dict(zip(missing, self._compute(missing))) if missing else {}
        for key, item in fresh.items():
            size = sum(t.numel() * t.element_size() for t in [item["z"], *item["text"].values(), *item["features"]])
            if self.bytes + size <= self.max_bytes:
                self.items[key] = item
                self.bytes += size
        items = [self.items.get(k) or fresh[k] for k in keys]
        device = self.backbone.device
        z = torch.stack([it["z"] for it in items]).to(device)
        embeds = _stack_embeds([it["text"] for it in items], device)
        features = [torch.cat([it["features"][n] for it in items]).to(device) for n in range(len(items[0]["features"]))]
        return z, embeds, features


# --------------------------------------------------------------------------------------------------
# The objective


def prediction_target(scheduler, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the frozen model predicts: eps (the paper), v (SD 2.x 768) or the clean sample."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(z0, noise, t)
    if kind == "sample":
        return z0
    raise ValueError(f"cannot tune for prediction_type {kind!r}; expected epsilon, v_prediction or sample.")


def tuning_loss(backbone: Backbone, bank: torch.nn.Module, z0: torch.Tensor, embeds: PromptEmbeds,
                features: Sequence[torch.Tensor], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Eq. 10: MSE of the frozen UNet's prediction at z_t^r with the bank's residuals of the pivot features."""
    scheduler = backbone.scheduler
    height, width = (s * backbone.spatial_factor for s in z0.shape[-2:])
    inputs = backbone.unet_inputs(embeds, height, width, do_cfg=False)
    noisy = scheduler.add_noise(z0, noise, t)
    with inject(backbone.unet, bank, features):
        pred = backbone.unet(noisy, t, **inputs, return_dict=False)[0]
    return F.mse_loss(pred.float(), prediction_target(scheduler, z0, noise, t).float())


# --------------------------------------------------------------------------------------------------
# Saving (safetensors + json only)


def save_bank(bank: UpsamplerBank, folder: Path, step: int, seconds: float) -> None:
    """The bank as safetensors + config, the config recording how many tuning steps made it, in how long."""
    bank.register_to_config(train_steps=step, train_seconds=round(seconds, 1))
    bank.save_pretrained(folder, safe_serialization=True)


# --------------------------------------------------------------------------------------------------
# Training


def _sizes(backbone: Backbone, scale: float, size: int | None) -> tuple[int, int]:
    """(pivot side, high-res side) in pixels for a ``scale``x pixel ratio."""
    side_factor = math.sqrt(scale)
    high = size if size is not None else round(backbone.base_size[0] * side_factor)
    low = high / side_factor
    multiple = backbone.size_multiple
    if abs(low - round(low)) > 1e-6 or round(low) % multiple or high % multiple:
        raise ValueError(f"--size {high} with --scale {scale:g} gives a pivot side of {low:g} px; both sides must be "
                         f"whole multiples of {multiple} px for this model: pick a --size whose pivot side "
                         f"size / sqrt(scale) is one (e.g. --scale 4 --size {4 * multiple}).")
    return round(low), high


def _validation_grid(cascade, bank: UpsamplerBank, prompts: list[str], size: int, steps: int, seed: int,
                     num_frames: int | None = None):
    """Tuning-free vs tuned rows, one column per prompt; for clips, each clip's middle frame."""
    from .grid import make_grid

    plan = cascade.plan(size, size)
    banks = [bank if s == (size, size) else None for s in plan.stages[1:]]
    video = {} if num_frames is None else {"num_frames": num_frames}
    rows = []
    for mode, extra in (("tuning-free", {}), ("tuned", {"upsamplers": banks})):
        out = cascade(prompts, size, size, mode=mode, num_inference_steps=steps, seed=seed, progress=False,
                      **video, **extra)
        rows.append(out.images if num_frames is None else [clip[num_frames // 2] for clip in out.images])
    return make_grid(rows, ["tuning-free", "tuned"], [p[:14] for p in prompts])


def run_signature(args: argparse.Namespace, model: str, k: int, low: int, high: int, frames: int | None) -> dict:
    """The settings a run's bank depends on, stored in its checkpoint: a run resumed under others is refused (a bank
    tuned under two settings would be a mix of both)."""
    return {"model": model, "scale": float(args.scale), "K": k, "size": [low, high], "injection": args.injection,
            "width": args.width, "time_width": args.time_width, "frames": frames}


def _frames(backbone: Backbone, frames: int | None) -> int | None:
    """Frames per training clip for a video model (default: the emoji clips' length); None for image models."""
    if backbone.is_video:
        return DEFAULT_FRAMES if frames is None else frames
    if frames is not None:
        raise ValueError(f"--frames applies only to text-to-video models; {backbone.name} is an image model.")
    return None


def train(args: argparse.Namespace, data: ImageCaptions | None = None) -> dict:
    """Tune (resuming from ``args.run_dir``'s checkpoint if any) until ``args.max_steps`` or for ``args.max_minutes``;
    returns the state."""
    from accelerate import Accelerator

    from .pipeline import SelfCascadePipeline

    deadline = deadline_after(args.max_minutes)
    cpu = args.cpu or not torch.cuda.is_available()
    precision = args.mixed_precision or ("no" if cpu else "fp16")
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision)
    device = accelerator.device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    cascade = SelfCascadePipeline.from_pretrained(args.model, device=device, dtype=weight_dtype)
    bb = cascade.backbone
    bb.freeze()
    low, high = _sizes(bb, args.scale, args.size)
    k = resolve_k(bb.scheduler.config.num_train_timesteps, args.K, default=bb.default_k)
    run_dir = Path(args.run_dir)
    frames = _frames(bb, args.frames)
    data = data if data is not None else load_data(args.data, high, frames=frames)
    if data.num_frames != frames:
        want = f"clips of {frames} frames (uint8 [N, 3, {frames}, S, S])" if frames else "images (uint8 [N, 3, S, S])"
        raise ValueError(f"{bb.name} tunes on {want}, but the data given is uint8 {tuple(data.images.shape)}; "
                         "pass data of that layout (for clips, --frames sets F).")

    if args.gradient_checkpointing:
        bb.unet.enable_gradient_checkpointing()  # recompute the frozen UNet's activations in backward
    signature = run_signature(args, bb.name, k, low, high, frames)
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None:
        state = read_checkpoint_state(ckpt)
        check_resume(state.get("signature"), signature, run_dir, hint=" (--init-from its bank to start from it)")
        bank = UpsamplerBank.from_pretrained(ckpt / "bank")
        logger.info("resuming from %s at step %d", ckpt, state["step"])
    elif args.init_from is not None:
        bank = UpsamplerBank.from_pretrained(str(args.init_from))
        bank.register_to_config(tuned_from=str(args.init_from))
        state = {"step": 0, "train_seconds": 0.0, "losses": []}
        logger.info("extendable tuning: starting from %s (tuned for %gx)", args.init_from, bank.config.scale)
    else:
        bank = UpsamplerBank.for_unet(bb.unet, width=args.width, time_width=args.time_width, injection=args.injection)
        state = {"step": 0, "train_seconds": 0.0, "losses": []}
    bank.check_compatible(bb.unet, bb.name)
    bank.register_to_config(base_model=bb.name, scale=float(args.scale), K=k, train_size=[high, high])
    state["args"] = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items() if key != "func"}
    state["signature"] = signature
    bank.to(device).train()
    optimizer = torch.optim.AdamW(bank.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if ckpt is not None:
        load_optimizer(optimizer, ckpt, state)
    state.pop("optimizer", None)
    model, optimizer = accelerator.prepare(bank, optimizer)
    cache = PivotCache(bb, data, low, max_bytes=args.cache_gb * 2**30, encode_batch=args.encode_batch)
    validation_prompts = args.validation_prompts or data.captions[:4]
    n_params = bank.num_parameters()
    logger.info("tuning a %d-parameter bank (%.4f%% of the %d-parameter UNet) for %dpx -> %dpx on %s, "
                "K=%d, batch %d per process, %d process(es)", n_params, 100 * n_params / bb.unet.num_parameters(),
                bb.unet.num_parameters(), low, high,
                f"{len(data)} clips of {frames} frames" if frames else f"{len(data)} images", k, args.batch_size,
                accelerator.num_processes)

    def write_bank(folder: Path) -> None:
        accelerator.unwrap_model(model).save_pretrained(folder / "bank", safe_serialization=True)

    def micro_losses(step: int, g: torch.Generator) -> Iterator[torch.Tensor]:
        """One loss per micro-batch of ``--batch-size``, ``--grad-accum`` of them per step."""
        for _ in range(args.grad_accum):
            idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
            dropped = torch.rand(args.batch_size, generator=g) < args.caption_dropout
            t = torch.randint(1, k + 1, (args.batch_size,), generator=g).to(device)
            z0, embeds, features = cache.batch(idx.tolist(), dropped.tolist())
            noise = torch.randn(z0.shape, generator=g).to(device, z0.dtype)
            with accelerator.autocast():
                yield tuning_loss(bb, model, z0, embeds, features, t, noise) / args.grad_accum

    def validate(step: int) -> None:
        _validate(cascade, accelerator.unwrap_model(model), validation_prompts, high, args, run_dir, step, frames)

    def after_step(step: int) -> None:
        if args.snapshot_every and step % args.snapshot_every == 0:
            save_bank(accelerator.unwrap_model(model), run_dir / "snapshots" / f"step-{step:06d}", step,
                      state["train_seconds"])
        if args.validate_every and step % args.validate_every == 0:
            validate(step)

    loop = LoopConfig(run_dir, args.max_steps, args.lr, 0, args.grad_clip, args.checkpoint_every, args.log_every,
                      args.seed, "train-upsamplers", deadline)
    train_loop(accelerator, model, optimizer, micro_losses, loop, state, write_bank, on_step=after_step)
    step = state["step"]
    if step < args.max_steps and args.validate_every and step % args.validate_every and accelerator.is_main_process:
        validate(step)  # stopped by --max-minutes: a grid of where it stopped
    if accelerator.is_main_process:
        output = Path(args.output) if args.output else run_dir / "bank"
        save_bank(accelerator.unwrap_model(model), output, step, state["train_seconds"])
        logger.info("bank saved to %s (step %d, loss %.4f, %.1f s)", output, step, state.get("loss", float("nan")),
                    state["train_seconds"])
    return state


def _validate(cascade, bank: UpsamplerBank, prompts: list[str], size: int, args: argparse.Namespace,
              run_dir: Path, step: int, num_frames: int | None) -> None:
    from .io import save_png

    with torch.no_grad():
        grid = _validation_grid(cascade, bank, prompts, size, args.validation_steps, args.seed, num_frames)
    bank.train()
    path = save_png(grid, run_dir / "validation" / f"step-{step:06d}.png")
    logger.info("validation grid: %s", path)


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id (stays frozen)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of images with NAME.txt captions beside them, or a data set folder/manifest.jsonl "
                             "(default: the emoji data set cache, train split); video models: a folder of .gif/.mp4 "
                             "clips or of sub-folders of PNG frames, NAME.txt beside each (default: the emoji motion "
                             "clips at --size, from `selfcascade data clips`)")
    parser.add_argument("--frames", type=parse_positive_int, default=None,
                        help="video models only: frames taken from the start of each clip, shorter clips skipped; "
                             f"None: {DEFAULT_FRAMES}, the emoji motion clips' length")
    parser.add_argument("--scale", type=float, default=4.0, help="pixel ratio of the stage to tune for (4 = 2x per side)")
    parser.add_argument("--size", type=int, default=None, help="high-res side in px (default: base side * sqrt(scale))")
    parser.add_argument("--K", type=int, default=None, help="largest timestep trained, of T=1000 (default: the model's sampling default, 700 on SD)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/upsamplers"), help="checkpoints, validation grids")
    parser.add_argument("--output", type=Path, default=None, help="final bank folder (default RUN_DIR/bank)")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this bank (extendable tuning)")
    parser.add_argument("--injection", choices=["skip", "hidden"], default="skip",
                        help="add residuals to skip features (paper) or to the hidden state passed on (new banks only)")
    parser.add_argument("--width", type=int, default=DEFAULT_WIDTH, help="channels inside each upsampler (new banks only)")
    parser.add_argument("--time-width", type=int, default=DEFAULT_TIME_WIDTH, help="timestep features (new banks only)")
    parser.add_argument("--max-steps", type=int, default=2000, help="train until this many steps in total")
    add_time_limit_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="images per micro-batch, per process")
    parser.add_argument("--grad-accum", type=parse_positive_int, default=1,
                        help="micro-batches per optimizer step (effective batch: batch size x this x processes)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute the frozen UNet's activations in the backward pass: less memory, ~30%% slower")
    parser.add_argument("--encode-batch", type=parse_positive_int, default=8,
                        help="images the VAE encodes at once when caching pivots (tiled above 1024x1024 px)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    parser.add_argument("--caption-dropout", type=float, default=0.1,
                        help="train on the empty prompt this often: guided sampling runs the bank on it too")
    parser.add_argument("--cache-gb", type=float, default=4.0, help="CPU memory for cached latents and pivot features")
    parser.add_argument("--validate-every", type=int, default=500, help="tuning-free vs tuned grid every N steps (0: off)")
    parser.add_argument("--validation-prompts", nargs="+", default=None, help="default: the first 4 training captions")
    parser.add_argument("--validation-steps", type=int, default=25, help="sampler steps for the validation grid")
    add_trainer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-upsamplers", "tune a feature-upsampler bank (the tuned self-cascade)", __doc__, add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_upsamplers", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
