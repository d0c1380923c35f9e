"""Train the embedded base model: a small text-to-image UNet in pixel space at 32x32.

The model exists to make the paper's claims measurable offline, so it is sized to train usefully on
2 CPU cores in a few hours of resumable background runs. Attention sits only at the lowest-resolution
level, which keeps the cost per step close to linear in pixels up to 256 px (the evaluation runs it
at 4x, 16x and 64x its training pixels). The same script runs on GPUs or several nodes through
accelerate.

``--frames F`` trains the embedded *video* model instead: the image model inflated to a
``UNet3DConditionModel`` (its spatial weights copied, temporal layers added as identities, so it starts
out as the image model applied per frame) and trained on the emoji motion clips (``selfcascade data
clips``) at 32 px.

Checkpoints hold only safetensors and json (no pickles): ``<run-dir>/checkpoint/`` is replaced
atomically every ``--checkpoint-every`` steps and training resumes from it automatically. Batches,
noise, timesteps and caption dropout are drawn from a generator seeded by (seed, step, rank), so a
resumed run continues exactly as an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from selfcascade.backbones.embedded import SCALE_CONDITIONING, is_scale_conditioned, zoom_label
from selfcascade.checkpoints import find_checkpoint, read_checkpoint_state
from selfcascade.commands import add_command, run_module, train_or_export
from selfcascade.data.emoji import STYLES
from selfcascade.text_encoder import DEFAULT_MAX_LENGTH, ENCODER_NAME, HIDDEN_SIZE
from selfcascade.training import (LoopConfig, check_resume, hardware, latest_ema, model_and_ema_writer,
                                  prepare_training, train_loop)
from selfcascade.unet_inflation import inflate_weights, video_config

logger = logging.getLogger(__name__)

BASE_SIZE = 32
MODEL_CARD_JSON = "selfcascade_model.json"

# Four levels (32, 16, 8, 4 px at the base size); attention only in the 4x4 level and the mid block.
DEFAULT_UNET: dict = {
    "sample_size": BASE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1,
    "attention_head_dim": 32,
    "cross_attention_dim": HIDDEN_SIZE,
    "norm_num_groups": 32,
}

SCHEDULER: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def build_unet(config: dict | None = None, video: bool = False):
    """A pixel-space UNet2DConditionModel from ``DEFAULT_UNET`` updated with ``config``; ``video``: a
    UNet3DConditionModel from ``config`` (see ``video_config``)."""
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    if video:
        return UNet3DConditionModel(**(config or video_config(DEFAULT_UNET)))
    return UNet2DConditionModel(**{**DEFAULT_UNET, **(config or {})})


def unet_config(unet: torch.nn.Module) -> dict:
    """A UNet's config as plain JSON-ready arguments for ``build_unet`` (tuples as lists, no private keys)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}


def inflate_unet(unet2d: torch.nn.Module) -> torch.nn.Module:
    """The image UNet inflated to a UNet3DConditionModel (``unet_inflation``); a scale-conditioned one at zoom 1,
    its label folded into the time embedding's bias, since clip frames are base-size content."""
    weights, config = unet2d.state_dict(), dict(unet2d.config)
    if is_scale_conditioned(unet2d):
        with torch.no_grad():
            label = torch.full((1,), zoom_label(1.0))
            weights["time_embedding.linear_2.bias"] = (weights["time_embedding.linear_2.bias"]
                                                       + unet2d.get_class_embed(label, label)[0])
        weights = {k: v for k, v in weights.items() if not k.startswith("class_embedding.")}
        config["class_embed_type"] = None
    return inflate_weights(config, weights)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER)


def add_scale_conditioning(unet: torch.nn.Module) -> torch.nn.Module:
    """The same UNet with a scale-conditioning class embedding whose output starts at zero, so it computes
    exactly what ``unet`` does until training teaches it the labels."""
    config = unet_config(unet)
    conditioned = build_unet({**config, **SCALE_CONDITIONING})
    result = conditioned.load_state_dict(unet.state_dict(), strict=False)
    if result.unexpected_keys or any(not k.startswith("class_embedding.") for k in result.missing_keys):
        raise ValueError(f"cannot add scale conditioning to this UNet: {result.unexpected_keys[:3]} "
                         f"{result.missing_keys[:3]}")
    torch.nn.init.zeros_(conditioned.class_embedding.linear_2.weight)
    torch.nn.init.zeros_(conditioned.class_embedding.linear_2.bias)
    return conditioned


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# Checkpoint state


# --------------------------------------------------------------------------------------------------
# Export


def export_model(out_dir: Path, unet_config: dict, weights: dict[str, torch.Tensor], info: dict) -> Path:
    """Write the shipped layout: ``unet/`` (diffusers, safetensors), ``scheduler/``, model json.

    ``info["num_frames"]`` (video models) marks a UNet3DConditionModel."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet = build_unet(unet_config, video=info.get("num_frames") is not None)
    unet.load_state_dict(weights)
    # fp16 storage halves the shipped size; loaders upcast (EmbeddedBackbone.from_folder).
    unet.half().save_pretrained(tmp / "unet", safe_serialization=True)
    build_scheduler().save_pretrained(tmp / "scheduler")
    card = {
        "text_encoder": ENCODER_NAME,
        "max_length": info.get("max_length", DEFAULT_MAX_LENGTH),
        "base_size": BASE_SIZE,
        "parameters": count_parameters(unet),
        **info,
    }
    (tmp / MODEL_CARD_JSON).write_text(json.dumps(card, indent=2) + "\n")
    for path in tmp.rglob("*"):  # save_pretrained may write 0600 files; the package data must be readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    # Swap in, keeping any other files (README/model card, sample grids) already in out_dir.
    out_dir.mkdir(parents=True, exist_ok=True)
    for child in tmp.iterdir():
        target = out_dir / child.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(child, target)
    tmp.rmdir()
    return out_dir


def export_checkpoint(run_dir: Path, out_dir: Path) -> Path:
    """Export the EMA weights of the latest checkpoint in ``run_dir``."""
    state, weights = latest_ema(run_dir, "train-base")
    return export_model(out_dir, state["unet_config"], weights, _card_info(state))


def _card_info(state: dict) -> dict:
    video = {"num_frames": state["num_frames"], "video_train_steps": state["step"],
             "video_train_seconds": round(state["train_seconds"]), "initialised_from": state.get("init_from", ""),
             "caption_format": "<CLDR label>, <up to 2 tags>, <style>, <motion words>",
             "data": "selfcascade emoji motion clips (selfcascade data clips), train split, at 32 px"}
    return {
        "train_steps": state["step"] + state.get("init_steps", 0),
        "train_seconds": round(state["train_seconds"] + state.get("init_seconds", 0.0)),
        "batch_size": state["args"]["batch_size"],
        "learning_rate": state["args"]["lr"],
        "ema_max_decay": state["args"]["ema_decay"],
        "caption_dropout": state["args"]["caption_dropout"],
        "zoom_prob": state["args"].get("zoom_prob", 0.0),
        "zoom_factors": state["args"].get("zoom_factors", [2]),
        "scale_conditioning": state["args"].get("scale_conditioning", False),
        "data": "selfcascade emoji data set, train split (OpenMoji, Twemoji, Noto, Fluent)",
        "caption_format": "<CLDR label>, <up to 2 tags>, <style>",
        "styles": list(STYLES.values()),
        "unconditional_prompt": "",
        "hardware": state.get("hardware", ""),
        "max_length": state["args"]["max_length"],
        # Measured on the eval split (README, "Status"): guidance at later stages repeats objects on this model.
        "refine_guidance_scale": 1.0,
        **(video if state.get("num_frames") else {}),
    }


# --------------------------------------------------------------------------------------------------
# Training


def training_loss(unet, scheduler, images: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor,
                  generator: torch.Generator, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (one per image or clip).

    Clips [B, 3, F, H, W] go to a UNet3DConditionModel, which takes no text mask (it attends to padding).
    ``class_labels``: scale-conditioning labels of a scale-conditioned UNet (``zoom_label``)."""
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator).to(images.device)
    noisy = scheduler.add_noise(images, noise, t)
    masks = {} if images.ndim == 5 else {"encoder_attention_mask": mask}
    if class_labels is not None:
        masks["class_labels"] = class_labels
    pred = unet(noisy, t, encoder_hidden_states=hidden, **masks).sample
    return F.mse_loss(pred.float(), noise.float())


def train(args: argparse.Namespace, dataset=None) -> dict:
    """Train (resuming from ``args.run_dir``'s checkpoint if any) until ``args.max_steps``.

    ``dataset`` defaults to the emoji train split at 32 px (``--frames``: the emoji motion clips); tests
    pass a tiny one. Returns the final checkpoint state.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    device = accelerator.device

    video = args.frames is not None
    if video and args.zoom_prob > 0:
        raise ValueError("--zoom-prob applies to image training only; drop it with --frames.")
    if args.scale_conditioning and (video or args.zoom_prob <= 0):
        raise ValueError("--scale-conditioning labels zoomed windows: it needs --zoom-prob > 0 and no --frames.")
    if dataset is None:
        dataset = _default_dataset(args)

    ckpt = find_checkpoint(run_dir)
    state: dict
    if ckpt is not None:
        state = read_checkpoint_state(ckpt)
        if state.get("num_frames") != args.frames:
            raise ValueError(f"{run_dir} holds a run with --frames {state.get('num_frames')}; resume it with the same "
                             "--frames or give another --run-dir.")
        unet = build_unet(state["unet_config"], video=video)
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        if args.scale_conditioning and not is_scale_conditioned(unet):
            raise ValueError(f"{run_dir} holds a run without --scale-conditioning; start it in a new --run-dir "
                             f"(e.g. --init-from an export of this one).")
        logger.info("resuming from %s at step %d", ckpt, state["step"])
    elif args.init_from or video:
        from selfcascade.backbones.embedded import SHIPPED_DIR

        init_dir = Path(args.init_from) if args.init_from else SHIPPED_DIR
        unet = _load_init(init_dir / "unet", video, args.scale_conditioning)
        card = json.loads((init_dir / MODEL_CARD_JSON).read_text()) if (init_dir / MODEL_CARD_JSON).exists() else {}
        state = {"step": 0, "train_seconds": 0.0, "init_from": str(args.init_from or "embedded"),
                 "init_steps": card.get("train_steps", 0), "init_seconds": card.get("train_seconds", 0.0)}
        logger.info("warm-starting from %s (%s steps), fresh optimizer", init_dir, state["init_steps"])
    else:
        torch.manual_seed(args.seed)  # reproducible initial weights
        config = json.loads(args.unet_config) if args.unet_config else {}
        unet = build_unet({**config, **(SCALE_CONDITIONING if args.scale_conditioning else {})})
        state = {"step": 0, "train_seconds": 0.0}
    state["unet_config"] = unet_config(unet)
    settings = {k: getattr(args, k) for k in ("batch_size", "lr", "warmup", "ema_decay", "caption_dropout",
                                               "seed", "max_length", "zoom_prob", "zoom_factors", "scale_conditioning")}
    check_resume(state.get("args"), settings, run_dir)
    state["args"] = settings
    state["hardware"] = hardware(accelerator)
    state["num_frames"] = args.frames

    unet, optimizer, ema = prepare_training(accelerator, unet, args.lr, args.ema_decay, ckpt, state, args.weight_decay)
    scheduler = build_scheduler()
    uncond_hidden, uncond_mask = dataset.uncond()
    n = len(dataset)
    logger.info("training %d-parameter UNet on %d images, batch %d, on %s",
                count_parameters(unet), n, args.batch_size, state["hardware"])

    conditioned = is_scale_conditioned(accelerator.unwrap_model(unet))

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        images, hidden, mask = dataset.batch(idx)
        drop = torch.rand(args.batch_size, generator=g) < args.caption_dropout
        hidden = torch.where(drop[:, None, None], uncond_hidden.expand_as(hidden), hidden)
        mask = torch.where(drop[:, None], uncond_mask.expand_as(mask), mask)
        labels = torch.zeros(args.batch_size) if conditioned else None
        if args.zoom_prob > 0:  # no extra draws otherwise, so older runs resume exactly
            zoom = torch.rand(args.batch_size, generator=g) < args.zoom_prob
            which = (torch.randint(0, len(args.zoom_factors), (args.batch_size,), generator=g)
                     if len(args.zoom_factors) > 1 else torch.zeros(args.batch_size, dtype=torch.long))
            for i, factor in enumerate(args.zoom_factors):
                chosen = zoom & (which == i)
                if chosen.any():
                    images[chosen] = dataset.zoomed(idx[chosen], g, factor)
                    if labels is not None:
                        labels[chosen] = zoom_label(factor)
        return training_loss(unet, scheduler, images.to(device), hidden.to(device), mask.to(device), g,
                             None if labels is None else labels.to(device))

    def on_checkpoint(step: int) -> None:
        if args.export and args.export_every and step % args.export_every == 0:
            export_checkpoint(run_dir, Path(args.export))

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, args.grad_clip, args.checkpoint_every,
                      0, args.seed, "train-base")
    train_loop(accelerator, unet, optimizer, loss_fn, loop, state, model_and_ema_writer(accelerator, unet, ema), ema,
               on_checkpoint)
    if args.export and accelerator.is_main_process:
        export_checkpoint(run_dir, Path(args.export))
    return state


def _default_dataset(args: argparse.Namespace):
    from selfcascade.data.emoji import default_cache_dir
    from selfcascade.data.loader import ClipDataset, EmojiDataset

    if args.frames is None:
        return EmojiDataset(args.cache_dir, size=BASE_SIZE, split="train", max_length=args.max_length)
    from selfcascade.data.emoji_clips import clips_dir
    from selfcascade.train_upsamplers import load_clip_folder

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    folder = clips_dir(cache_dir, BASE_SIZE, "train")
    if not folder.is_dir():
        raise FileNotFoundError(f"no emoji motion clips at {BASE_SIZE} px in {folder}: make them with "
                                f"`selfcascade data clips --sizes {BASE_SIZE} 64 --count 3000`.")
    clips = load_clip_folder(folder, BASE_SIZE, args.frames)
    return ClipDataset(clips.images, clips.captions, cache_dir, args.max_length)


def _load_init(unet_dir: Path, video: bool, scale_conditioning: bool = False) -> torch.nn.Module:
    """The UNet of an exported model; for video training a 2D one is inflated (``inflate_unet``); with
    ``scale_conditioning`` one without it gains it (``add_scale_conditioning``)."""
    import diffusers

    unet_class = json.loads((unet_dir / "config.json").read_text())["_class_name"]
    if video and unet_class == "UNet2DConditionModel":
        return inflate_unet(diffusers.UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch.float32))
    if unet_class != ("UNet3DConditionModel" if video else "UNet2DConditionModel"):
        raise ValueError(f"{unet_dir} holds a {unet_class}; {'--frames needs' if video else 'image training needs'} "
                         "a UNet2DConditionModel (or, with --frames, a UNet3DConditionModel) to start from.")
    unet = getattr(diffusers, unet_class).from_pretrained(unet_dir, torch_dtype=torch.float32)
    return add_scale_conditioning(unet) if scale_conditioning and not is_scale_conditioned(unet) else unet


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/base"), help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data set cache (see `selfcascade data build`)")
    parser.add_argument("--max-steps", type=int, default=20000, help="train until this many steps in total")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="for classifier-free guidance")
    parser.add_argument("--zoom-prob", type=float, default=0.0,
                        help="share of a batch shown as random 32 px windows of larger renderings (parts at 2x or "
                             "4x scale, what cascade stages ask the model to denoise)")
    parser.add_argument("--scale-conditioning", action="store_true",
                        help="tell the UNet each window's zoom (a class label; new runs and --init-from), so cascade "
                             "stages can ask for content at their scale")
    parser.add_argument("--zoom-factors", type=int, nargs="+", default=[2],
                        help="zoom factors drawn uniformly for --zoom-prob windows (2: 64 px renderings, 4: 128 px)")
    parser.add_argument("--frames", type=int, default=None,
                        help="train the embedded video model on clips of this many frames (the image model of "
                             "--init-from, default the shipped one, inflated with temporal layers)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="caption tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--unet-config", default=None, help="json overrides of the UNet config (new runs only)")
    parser.add_argument("--init-from", type=Path, default=None, help="warm-start from an exported model folder")
    parser.add_argument("--export", type=Path, default=None, help="export the EMA weights here at the end")
    parser.add_argument("--export-every", type=int, default=0, help="also export every N steps (multiple of --checkpoint-every)")
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and exit")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def run(args: argparse.Namespace) -> None:
    train_or_export(args, train, export_checkpoint)


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-base", "train the embedded 32 px base model (resumable)", __doc__, add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_base", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
