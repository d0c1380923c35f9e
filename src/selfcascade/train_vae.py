"""Train the embedded model's VAE: a diffusers ``AutoencoderKL`` with Stable Diffusion's layout.

8x downsampling to 4 latent channels, as in SD, so every SD tool (latent pivots, tiled decoding,
HiDiffusion) runs on the embedded model as it does on SD. The mid-block attention is left out: the VAE
is then purely convolutional, trains on small crops and decodes a 1024 px canvas at the cost of its
pixels (an attention over 16k latent tokens would dominate it). Training windows are random crops of
the train split rendered at 128 px (whole emoji) and 256 px (parts at 2x), so outlines stay crisp on
large canvases. Loss: L1 plus L1 of image gradients (edges) plus a tiny KL term (SD's 1e-6).

The latent scaling factor is computed from the data at export, as SD's was: 1 / std of the latents of
train images. Resumable from ``RUN_DIR/checkpoint`` through the shared loop (``selfcascade.training``).

``--init-from VAE_DIR`` continues an exported VAE; with ``--decoder-only`` only its decoder (and
post_quant_conv) trains, the encoder and quant_conv are frozen and the export keeps the source's scaling
factor, so the latents a UNet was trained on, and the UNet itself, stay valid.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .checkpoints import find_checkpoint, read_checkpoint_state
from .commands import add_command, run_module
from .training import (LoopConfig, check_resume, hardware, latest_ema, model_and_ema_writer, prepare_training,
                       prior_training, train_loop, write_train_summary)

logger = logging.getLogger(__name__)

DEFAULT_VAE: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 128,
    "mid_block_add_attention": False,
}
#: Settings that must match to resume a run.
RESUME_KEYS = ("batch_size", "crop", "lr", "kl_weight", "edge_weight", "sizes", "seed", "vae_config", "ema_decay",
               "init_from", "decoder_only")


def build_vae(config: dict | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**DEFAULT_VAE, **(config or {})})


def freeze_encoder(vae) -> None:
    """Encoder and quant_conv: no gradients and eval mode, kept through the loop's ``model.train()``, so a
    decoder-only run leaves the latents (and the UNet trained on them) exactly as they were."""
    for part in (vae.encoder, vae.quant_conv):
        part.requires_grad_(False).eval()
        part.train = lambda mode=True, part=part: part  # nn.Module.train() recurses through this


def _vae_config(args: argparse.Namespace) -> dict:
    """A new VAE's layout (defaults and ``--vae-config``), or the whole config of the ``--init-from`` VAE,
    its scaling factor included."""
    if args.decoder_only and args.init_from is None:
        raise ValueError("--decoder-only fine-tunes the decoder of an existing VAE: give it with --init-from VAE_DIR")
    if args.init_from is None:
        return {**DEFAULT_VAE, **(json.loads(args.vae_config) if args.vae_config else {})}
    if args.vae_config:
        raise ValueError("--vae-config sets up a new VAE; --init-from continues the VAE in VAE_DIR with its own layout")
    if not (Path(args.init_from) / "config.json").is_file():
        raise FileNotFoundError(f"{args.init_from} holds no VAE (config.json); give a folder written by "
                                "`selfcascade train-vae --export`")
    from diffusers import AutoencoderKL

    return {k: v for k, v in AutoencoderKL.load_config(args.init_from).items() if not k.startswith("_")}


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae, images: torch.Tensor, generator: torch.Generator, kl_weight: float,
             edge_weight: float) -> torch.Tensor:
    """Reconstruction (L1 + edge L1) of a posterior sample, plus the KL to N(0, I)."""
    posterior = vae.encode(images).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(images.device)
    z = posterior.mean + posterior.std * noise
    recon = vae.decode(z).sample
    loss = F.l1_loss(recon, images)
    if edge_weight:
        for a, b in zip(image_gradients(recon), image_gradients(images)):
            loss = loss + edge_weight * F.l1_loss(a, b)
    return loss + kl_weight * posterior.kl().mean() / images[0].numel()


class CropSource:
    """Random square crops of uint8 image stacks of several sizes, in [-1, 1]."""

    def __init__(self, stacks: Sequence[torch.Tensor], crop: int) -> None:
        for s in stacks:
            if s.shape[-1] < crop:
                raise ValueError(f"crop {crop} px is larger than images of {s.shape[-1]} px; lower --crop")
        self.stacks, self.crop = list(stacks), crop

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        which = torch.randint(0, len(self.stacks), (batch_size,), generator=generator).tolist()
        out = []
        for k in which:
            stack = self.stacks[k]
            i = int(torch.randint(0, len(stack), (1,), generator=generator))
            span = stack.shape[-1] - self.crop + 1
            y, x = (int(v) for v in torch.randint(0, span, (2,), generator=generator))
            out.append(stack[i, :, y:y + self.crop, x:x + self.crop])
        return torch.stack(out).float() / 127.5 - 1.0


def _default_source(args: argparse.Namespace) -> CropSource:
    from .data.emoji import default_cache_dir, read_manifest
    from .data.loader import load_images

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    records = [r for r in read_manifest(cache_dir) if r["split"] == "train"]
    return CropSource([load_images(cache_dir, records, s, "train") for s in args.sizes], args.crop)


def _settings(args: argparse.Namespace, vae_config: dict) -> dict:
    return {"batch_size": args.batch_size, "crop": args.crop, "lr": args.lr, "kl_weight": args.kl_weight,
            "edge_weight": args.edge_weight, "sizes": list(args.sizes), "seed": args.seed,
            "vae_config": vae_config, "ema_decay": args.ema_decay, "warmup": args.warmup,
            "init_from": None if args.init_from is None else str(args.init_from), "decoder_only": args.decoder_only}


def train(args: argparse.Namespace, source: CropSource | None = None) -> dict:
    """Train (resuming from ``args.run_dir`` if it holds a checkpoint) to ``args.max_steps``; return the state."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.cpu)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    config = _vae_config(args)
    settings = _settings(args, config)
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None:
        state = read_checkpoint_state(ckpt)
        check_resume(state.get("args"), settings, run_dir)
        logger.info("resuming from %s at step %d", ckpt, state["step"])
    else:
        state = {"step": 0, "train_seconds": 0.0}
    state["args"], state["hardware"] = settings, hardware(accelerator)
    torch.manual_seed(args.seed)
    vae = build_vae(config)
    if ckpt is not None:
        vae.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    elif args.init_from is not None:
        from diffusers import AutoencoderKL

        vae.load_state_dict(AutoencoderKL.from_pretrained(args.init_from).state_dict())
        state["init_from"] = prior_training(Path(args.init_from))
    if args.decoder_only:
        freeze_encoder(vae)
    source = source or _default_source(args)
    vae, optimizer, ema = prepare_training(accelerator, vae, args.lr, args.ema_decay, ckpt, state)
    logger.info("training %d of a %d-parameter VAE's weights on %d px crops, batch %d, on %s",
                sum(p.numel() for p in vae.parameters() if p.requires_grad), sum(p.numel() for p in vae.parameters()),
                args.crop, args.batch_size, state["hardware"])

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        images = source.batch(args.batch_size, g).to(accelerator.device)
        return vae_loss(vae, images, g, args.kl_weight, args.edge_weight)

    loop = LoopConfig(run_dir, args.max_steps, args.lr, args.warmup, args.grad_clip, args.checkpoint_every,
                      args.log_every, args.seed, "train-vae")
    train_loop(accelerator, vae, optimizer, loss_fn, loop, state, model_and_ema_writer(accelerator, vae, ema), ema)
    if args.export and accelerator.is_main_process:
        export_vae(run_dir, Path(args.export), source)
    return state


@torch.no_grad()
@torch.no_grad()
def latent_statistics(vae, images: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the posterior means of ``images`` (in [-1, 1])."""
    means = torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)])
    return means.mean((0, 2, 3)), means.std((0, 2, 3))


@torch.no_grad()
def standardize_latents(vae, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold a per-channel affine into the VAE so its latents have zero mean and unit std per channel, with
    ``scaling_factor`` 1: the encoder's ``quant_conv`` maps its posterior means to ``(mean_raw - mean) / std`` and
    the decoder's ``post_quant_conv`` undoes it, so reconstructions are unchanged. ``mean``/``std`` are the
    statistics of the raw posterior means ``[C]``. A stock SD pipeline applies only ``scaling_factor``, no shift,
    and a diffusion model started from zero-mean noise draws the wrong colours for long when the latents sit far
    from zero (v3's first run: channel means -1.45 to 0.26)."""
    channels = vae.config.latent_channels
    q, p = vae.quant_conv, vae.post_quant_conv
    q.weight[:channels] /= std.view(-1, 1, 1, 1)
    q.bias[:channels] = (q.bias[:channels] - mean) / std
    q.bias[channels:] -= 2 * torch.log(std)  # log-variance of the standardised posterior
    p.bias += p.weight[:, :, 0, 0] @ mean
    p.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)


def export_vae(run_dir: Path, out_dir: Path, source: CropSource, count: int = 256) -> Path:
    """The EMA weights of the latest checkpoint as a diffusers folder, its latents standardised on the data
    (``standardize_latents``); a decoder-only run keeps its source's latents, the ones a UNet learned."""
    from .io import atomic_dir

    state, weights = latest_ema(run_dir, "train-vae")
    vae = build_vae(state["args"]["vae_config"])
    vae.load_state_dict(weights)
    vae.eval()
    if not state["args"].get("decoder_only"):
        g = torch.Generator().manual_seed(0)
        standardize_latents(vae, *latent_statistics(vae, torch.cat([source.batch(32, g) for _ in range(max(1, count // 32))])))
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        write_train_summary(tmp, state)
    logger.info("exported VAE to %s", out_dir)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vae"), help="checkpoints go to RUN_DIR/checkpoint")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data set cache (see `selfcascade data build`)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="renders to crop from")
    parser.add_argument("--crop", type=int, default=64, help="training window side in pixels (multiple of 8)")
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="KL to N(0, I) per pixel value")
    parser.add_argument("--edge-weight", type=float, default=1.0, help="L1 of image gradients: keeps outlines crisp")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--vae-config", default=None, help="json overrides of the AutoencoderKL config (new runs)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="new runs: start from this VAE (a `train-vae --export` folder), layout included")
    parser.add_argument("--decoder-only", action="store_true",
                        help="with --init-from: train only the decoder; encoder, latents and scaling factor stay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--export", type=Path, default=None, help="write the EMA VAE here at the end")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def run(args: argparse.Namespace) -> None:
    train(args)


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "train-vae", "train the embedded model's VAE (resumable)", __doc__, add_arguments, run)


def main(argv: Sequence[str] | None = None) -> None:
    run_module("python -m selfcascade.train_vae", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
