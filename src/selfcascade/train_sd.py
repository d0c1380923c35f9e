"""Train the v3 embedded model's UNet: a tiny Stable Diffusion on the emoji renders at 128 px (16x16 latents).

The VAE comes from ``selfcascade train-vae`` (its export folder); images and captions are encoded once
(latents through the VAE's posterior mode times its scaling factor, captions exactly as the stock
pipeline encodes them, ``embedded_sd.encode_prompts``) and held in memory, so a step is one UNet pass.
Recipe knobs: epsilon or v-prediction, min-SNR-gamma loss weighting (Hang et al. 2023), caption dropout
for guidance, EMA. Resumable through the shared loop; ``--export`` writes a stock SD folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .checkpoints import find_checkpoint, read_checkpoint_state
from .commands import add_command, run_module
from .embedded_sd import (BASE_SIZE, SD15_UNET, build_sd_scheduler, build_sd_unet, encode_prompts, load_text_components,
                          save_sd_folder)
from .text_encoder import DEFAULT_MAX_LENGTH
from .training import (EMA, LoopConfig, check_resume, hardware, latest_ema, model_and_ema_writer,
                       restore_model_and_ema, train_loop)

logger = logging.getLogger(__name__)


class LatentData:
    """Latents [N, 4, h, w], caption states [N, L, 384] and the empty prompt's states [L, 384]."""

    def __init__(self, latents: torch.Tensor, context: torch.Tensor, uncond: torch.Tensor) -> None:
        self.latents, self.context, self.uncond = latents, context, uncond

    def __len__(self) -> int:
        return len(self.latents)


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, captions: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH,
                   batch_size: int = 64) -> LatentData:
    """uint8 images [N, 3, S, S] and their captions -> ``LatentData`` (fp16 storage, fp32 batches)."""
    device = vae.device
    latents = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1.0
        latents.append((vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).half().cpu())
    tokenizer, encoder = load_text_components(max_length)
    encoder.to(device)
    context = torch.cat([encode_prompts(tokenizer, encoder, captions[i:i + 256]).half().cpu()
                         for i in range(0, len(captions), 256)])
    return LatentData(torch.cat(latents), context, encode_prompts(tokenizer, encoder, [""])[0].cpu())


def diffusion_loss(unet, scheduler, latents: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                   min_snr_gamma: float = 0.0) -> torch.Tensor:
    """MSE to the scheduler's target (epsilon or v) at uniform timesteps, min-SNR weighted when gamma > 0."""
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    v_pred = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v_pred else noise
    pred = unet(noisy, t, encoder_hidden_states=context).sample
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma > 0:
        snr = (scheduler.alphas_cumprod.to(t.device)[t] / (1 - scheduler.alphas_cumprod.to(t.device)[t]))
        weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1 if v_pred else snr)
        per_item = per_item * weight
    return per_item.mean()


def _settings(args: argparse.Namespace, unet_config: dict) -> dict:
    return {"batch_size": args.batch_size, "lr": args.lr, "warmup": args.warmup, "ema_decay": args.ema_decay,
            "caption_dropout": args.caption_dropout, "prediction_type": args.prediction_type,
            "min_snr_gamma": args.min_snr_gamma, "seed": args.seed, "max_length": args.max_length,
            "unet_config": unet_config, "vae": str(args.vae)}


def _default_data(args: argparse.Namespace, vae) -> LatentData:
    """The train split at 128 px, encoded once and cached beside the run (``latents.safetensors``)."""
    from .data.emoji import default_cache_dir, read_manifest
    from .data.loader import load_images

    cache = Path(args.run_dir) / "latents.safetensors"
    if cache.exists():
        t = load_file(str(cache))
        return LatentData(t["latents"], t["context"], t["uncond"])
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    records = [r for r in read_manifest(cache_dir) if r["split"] == "train"]
    data = encode_dataset(vae, load_images(cache_dir, records, BASE_SIZE, "train"), [r["caption"] for r in records],
                          args.max_length)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": data.latents, "context": data.context, "uncond": data.uncond.contiguous()}, str(cache))
    return data


def train(args: argparse.Namespace, data: LatentData | None = None) -> dict:
    """Train (resuming from ``args.run_dir``'s checkpoint if any) to ``args.max_steps``; return the state."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL

    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_dir, device = Path(args.run_dir), accelerator.device
    config = {**SD15_UNET, **(json.loads(args.unet_config) if args.unet_config else {})}
    settings = _settings(args, config)
    ckpt = find_checkpoint(run_dir)
    state = read_checkpoint_state(ckpt) if ckpt is not None else {"step": 0, "train_seconds": 0.0}
    if ckpt is not None:
        check_resume(state, settings, run_dir)
    state["args"], state["hardware"] = settings, hardware(accelerator)
    vae = AutoencoderKL.from_pretrained(args.vae).to(device).eval()
    data = data or _default_data(args, vae)
    torch.manual_seed(args.seed)
    unet = build_sd_unet(config)
    if ckpt is not None:
        unet.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    unet.to(device)
    ema = EMA(unet, args.ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    if ckpt is not None:
        restore_model_and_ema(ckpt, ema, optimizer, state, device)
    state.pop("optimizer", None)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = build_sd_scheduler(args.prediction_type)
    logger.info("training a %d-parameter SD UNet on %d latents, batch %d, on %s",
                sum(p.numel() for p in unet.parameters()), len(data), args.batch_size, state["hardware"])

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        drop = torch.rand(args.batch_size, generator=g) < args.caption_dropout
        context = torch.where(drop[:, None, None], data.uncond.half().expand(args.batch_size, -1, -1),
                              data.context[idx])
        return diffusion_loss(unet, scheduler, data.latents[idx].float().to(device), context.float().to(device), g,
                              args.min_snr_gamma)

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, args.grad_clip, args.checkpoint_every,
                      args.log_every, args.seed, "train-sd")
    train_loop(accelerator, unet, optimizer, loss_fn, loop, state, model_and_ema_writer(accelerator, unet, ema), ema)
    if args.export and accelerator.is_main_process:
        export_run(run_dir, Path(args.export))
    return state


def export_run(run_dir: Path, out_dir: Path) -> Path:
    """The EMA UNet of the latest checkpoint, with its VAE, MiniLM and SD's scheduler, as a stock SD folder."""
    from diffusers import AutoencoderKL

    state, weights = latest_ema(run_dir, "train-sd")
    settings = state["args"]
    unet = build_sd_unet(settings["unet_config"])
    unet.load_state_dict(weights)
    folder = save_sd_folder(out_dir, unet, AutoencoderKL.from_pretrained(settings["vae"]), settings["max_length"],
                            build_sd_scheduler(settings["prediction_type"]), state)
    return folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vae", type=Path, required=True, 
                        help="AutoencoderKL folder (`selfcascade train-vae --export`)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sd"), help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data set cache (see `selfcascade data build`)")
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="share trained unconditionally (guidance)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    parser.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting (0: off)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="caption tokens")
    parser.add_argument("--unet-config", default=None, help="json overrides of the SD 1.5-layout UNet config")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--export", type=Path, default=None, help="write a stock SD folder here at the end")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def run(args: argparse.Namespace) -> None:
    train(args)


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-sd", "train the v3 embedded model's UNet (tiny SD, resumable)", __doc__,
                add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_sd", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
