"""Train the v3 embedded model's video sibling: its UNet inflated to a ``UNet3DConditionModel``, trained on clips.

``--init-from`` names the image model (a ``train-sd --export`` folder, or the package's v3 folder once shipped),
which brings its VAE, UNet, noise schedule and sampling defaults. The UNet is inflated (``unet_inflation``:
spatial weights copied, temporal layers identities, so training starts from the image model applied per
frame); the motion clips (``selfcascade data clips``) are encoded once, frame by frame with the same VAE and
captions as the stock pipeline encodes them, and cached beside the run; training then runs ``train_sd``'s loss
on the shared loop (exact resume, refusal of other settings, EMA). ``--export`` writes a stock
``TextToVideoSDPipeline`` folder that carries the image model's ``selfcascade.json``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoints import deadline_after, find_checkpoint, read_checkpoint_state
from .commands import add_command, add_cooldown_argument, add_time_limit_argument, run_module, train_or_export
from . import embedded_sd
from .embedded_sd import BASE_SIZE, build_sd_scheduler, folder_sampling, save_sd_folder, ship_parts, vae_dir
from .io import atomic_path
from .text_encoder import DEFAULT_MAX_LENGTH
from .train_sd import LatentData, diffusion_loss, drop_captions, encode_captions, encode_images, sample_batch
from .training import (LoopConfig, check_resume, hardware, latest_ema, model_and_ema_writer, prepare_training,
                       prior_training, train_loop)
from .unet_inflation import inflate_unet

logger = logging.getLogger(__name__)

#: Frames per training clip (``selfcascade data clips`` renders 8).
DEFAULT_FRAMES = 8
#: The stock UNet3D's one attention head width for the v3 layout (8 heads at widths 32/64/128, i.e. heads 4, 8
#: and 16 wide): 8 keeps the 64-wide level's split and starts closest to the image model (relative error of
#: the inflated UNet's noise prediction 2.5%, against 4.0% for width 4 and 6.7% for 16; random latents at
#: t=300 and 700, a 2000-step v3 run).
DEFAULT_HEAD_DIM = 8
#: What an image model folder must hold.
IMAGE_PARTS = ("unet", "vae", "scheduler")


def image_model_dir(folder: Path) -> Path:
    """``folder`` if it holds an image model's parts, else a clear error."""
    folder = Path(folder)
    missing = [part for part in IMAGE_PARTS if not (folder / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}/: --init-from takes a v3 image model folder "
                                "(`selfcascade train-sd --export DIR`, or the package's shipped v3 folder).")
    return folder


def encode_clips(vae, clips: torch.Tensor, captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH) -> LatentData:
    """uint8 clips [N, 3, F, S, S] and their captions -> ``LatentData`` of latent clips [N, C, F, S/8, S/8]."""
    n, _, frames = clips.shape[:3]
    latents = encode_images(vae, clips.transpose(1, 2).flatten(0, 1)).unflatten(0, (n, frames)).transpose(1, 2)
    context, uncond = encode_captions(captions, max_length, vae.device)
    return LatentData(latents.contiguous(), context, uncond)


def _default_data(args: argparse.Namespace, vae) -> LatentData:
    """The clips (``--data``, default the emoji motion clips at the base size), encoded once and cached beside the
    run (``clip_latents.safetensors``; encoded again when made from other clips, frames, VAE or caption length)."""
    from .train_upsamplers import load_data

    cache = Path(args.run_dir) / "clip_latents.safetensors"
    made_with = {"data": str(args.data), "frames": str(args.frames), "max_length": str(args.max_length),
                 "vae": str(Path(args.init_from) / "vae")}
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            if f.metadata() == made_with:
                return LatentData(f.get_tensor("latents"), f.get_tensor("context"), f.get_tensor("uncond"))
        logger.info("%s was made from other clips or settings: encoding again", cache)
    clips = load_data(args.data, BASE_SIZE, "train", args.frames)
    data = encode_clips(vae, clips.images, clips.captions, args.max_length)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(cache) as tmp:
        save_file({"latents": data.latents, "context": data.context, "uncond": data.uncond.contiguous()}, str(tmp),
                  metadata=made_with)
    return data


def _settings(args: argparse.Namespace) -> dict:
    return {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "cooldown": args.cooldown,
            "ema_decay": args.ema_decay, "caption_dropout": args.caption_dropout, "min_snr_gamma": args.min_snr_gamma,
            "seed": args.seed, "max_length": args.max_length, "frames": args.frames, "head_dim": args.head_dim,
            "init_from": str(args.init_from), "data": None if args.data is None else str(args.data)}


def train(args: argparse.Namespace, data: LatentData | None = None) -> dict:
    """Train (resuming from ``args.run_dir``'s checkpoint if any) to ``args.max_steps`` or for ``args.max_minutes``;
    return the state. ``data``: latent clips (``encode_clips``) instead of the default clips, for tests."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel, UNet3DConditionModel

    deadline = deadline_after(args.max_minutes)
    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_dir, device, init_dir = Path(args.run_dir), accelerator.device, image_model_dir(args.init_from)
    settings = _settings(args)
    ckpt = find_checkpoint(run_dir)
    state = read_checkpoint_state(ckpt) if ckpt is not None else {"step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        check_resume(state.get("args"), settings, run_dir, ignore=("cooldown",))
        unet = UNet3DConditionModel(**state["unet_config"])
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    else:
        image_unet = UNet2DConditionModel.from_pretrained(init_dir / "unet", torch_dtype=torch.float32)
        torch.manual_seed(args.seed)  # reproducible temporal layers
        unet = inflate_unet(image_unet, args.head_dim)
        state["init_from"] = prior_training(init_dir)
        state["unet_config"] = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    # The image model's schedule (and its epsilon or v target) stays the video model's.
    state["prediction_type"] = DDIMScheduler.load_config(init_dir / "scheduler")["prediction_type"]
    state["args"], state["hardware"] = settings, hardware(accelerator)
    if data is None:
        data = _default_data(args, AutoencoderKL.from_pretrained(init_dir / "vae").to(device).eval())
    unet, optimizer, ema = prepare_training(accelerator, unet, args.lr, args.ema_decay, ckpt, state)
    scheduler = build_sd_scheduler(state["prediction_type"])
    logger.info("training a %d-parameter UNet3D on %d clips of %d frames, batch %d, on %s",
                sum(p.numel() for p in unet.parameters()), len(data), data.latents.shape[2], args.batch_size,
                state["hardware"])

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        latents, context = sample_batch(data, args.batch_size, 0.0, g)
        context = drop_captions(context, data.uncond, args.caption_dropout, g)
        # The temporal convolutions' dropout draws from torch's global generator: seeded per step, so resuming
        # stays exact.
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
        return diffusion_loss(unet, scheduler, latents.float().to(device), context.float().to(device), g,
                              args.min_snr_gamma)

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, args.grad_clip, args.checkpoint_every,
                      args.log_every, args.seed, "train-sd-video", deadline, cooldown=args.cooldown)
    train_loop(accelerator, unet, optimizer, loss_fn, loop, state, model_and_ema_writer(accelerator, unet, ema), ema)
    if args.export and accelerator.is_main_process:
        export_run(run_dir, Path(args.export))
    if args.ship and accelerator.is_main_process:
        ship_run(run_dir)
    return state


def _run_unet(run_dir: Path) -> tuple[dict, torch.nn.Module]:
    from diffusers import UNet3DConditionModel

    state, weights = latest_ema(run_dir, "train-sd-video")
    unet = UNet3DConditionModel(**state["unet_config"])
    unet.load_state_dict(weights)
    return state, unet


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """The EMA UNet3D of the latest checkpoint with the image model's VAE, MiniLM, SD's schedule and sampling
    defaults, as a stock ``TextToVideoSDPipeline`` folder."""
    from diffusers import AutoencoderKL

    state, unet = _run_unet(run_dir)
    init_dir = image_model_dir(state["args"]["init_from"])
    return save_sd_folder(out_dir, unet, AutoencoderKL.from_pretrained(init_dir / "vae"), state["args"]["max_length"],
                          build_sd_scheduler(state["prediction_type"]), state, _sampling(init_dir, state))


def _sampling(image_dir: Path, state: dict) -> dict:
    """The image model's sampling defaults, and the clip length the sibling was trained on."""
    return {**folder_sampling(image_dir), "num_frames": state["args"]["frames"]}


def ship_run(run_dir: Path, folder: Path | None = None) -> Path:
    """Put a run's EMA UNet3D (fp16), scheduler, ``train_state.json`` and sampling defaults into the package as the
    v3 video sibling (``embedded-video``), which decodes with the image model's VAE around it; values already chosen
    in its ``selfcascade.json`` (by measurement) are kept, its banks stay."""
    state, unet = _run_unet(run_dir)
    folder = Path(folder or embedded_sd.SHIPPED_VIDEO_DIR)
    if vae_dir(folder) is None:
        raise FileNotFoundError(f"{folder.parent / 'vae'} not found: the video sibling ships inside the image model's "
                                "folder, whose VAE it decodes with.")
    ship_parts(folder, unet, build_sd_scheduler(state["prediction_type"]),
               _sampling(image_model_dir(state["args"]["init_from"]), state), state)
    logger.info("shipped step %d of %s into %s", state["step"], run_dir, folder)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-from", type=Path, required=True,
                        help="the v3 image model folder (`train-sd --export`): its VAE, UNet (inflated), schedule and "
                             "sampling defaults")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sd-video"),
                        help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"clip folder (default: the emoji motion clips at {BASE_SIZE} px, `selfcascade data clips "
                             f"--sizes {BASE_SIZE}`)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES, help="frames per training clip")
    parser.add_argument("--head-dim", type=int, default=DEFAULT_HEAD_DIM,
                        help="attention head width of the UNet3D (one for all levels; see unet_inflation)")
    parser.add_argument("--max-steps", type=int, default=5000)
    add_time_limit_argument(parser)
    add_cooldown_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share trained unconditionally (guidance)")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting (0: off)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="caption tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--export", type=Path, default=None, help="write a stock TextToVideoSDPipeline folder here")
    parser.add_argument("--export-only", action="store_true", help="export the latest checkpoint and exit")
    parser.add_argument("--ship", action="store_true",
                        help="at the end, put the EMA UNet3D into the package as `embedded-video` (developers)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def run(args: argparse.Namespace) -> None:
    train_or_export(args, train, export_run)


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-sd-video", "train the v3 model's video sibling (inflated UNet3D, resumable)",
                __doc__, add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_sd_video", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
