"""Full fine-tuning and LoRA of the UNet at the target size: the training baselines of the paper's Tables 1-2.

    selfcascade finetune --method full --size 64 --max-steps 2000 --output runs/ft-full/model
    selfcascade finetune --method lora --rank 4 --size 64 --max-steps 2000 --output runs/ft-lora4/model
    selfcascade generate "red apple" --size 64 --mode direct --unet-weights runs/ft-full/model

Same data, batch and step budget as ``selfcascade train-upsamplers`` (the images at the target size and
their captions), but the plain diffusion objective (t ~ U{0..T-1}) over every UNet weight (``full``)
or over LoRA adapters on the attention projections (``lora``, peft). The result is sampled by direct
inference at the target size. LoRA adapters are merged into the weights on export, so both write the
same thing: ``unet.safetensors`` (the whole UNet state) plus ``finetune.json`` (base model, method,
trainable parameters, steps). Checkpoints hold only the trainable tensors and resume automatically;
``--snapshot-every`` keeps exported copies along the way for quality-over-steps curves.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..checkpoints import deadline_after, find_checkpoint, load_optimizer, read_checkpoint_state
from ..commands import add_command, add_time_limit_argument, add_trainer_arguments, run_module
from ..io import atomic_path
from ..loading import FINETUNE_INFO_FILE, FINETUNE_WEIGHTS_FILE
from ..train_upsamplers import ImageCaptions, load_data, prediction_target
from ..training import LoopConfig, check_resume, train_loop

logger = logging.getLogger(__name__)

METHODS = ("full", "lora")
#: diffusers' attention projections, the usual LoRA targets for UNets.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(unet: torch.nn.Module, rank: int) -> None:
    """LoRA adapters (alpha = rank) on every attention projection; everything else frozen."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def merged_state_dict(unet: torch.nn.Module, method: str) -> dict[str, torch.Tensor]:
    """The UNet's plain state dict (LoRA folded into the base weights): loads into an unmodified UNet."""
    if method == "lora":
        import copy

        from peft.tuners.tuners_utils import BaseTunerLayer

        unet = copy.deepcopy(unet)
        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        state = {}
        for name, value in unet.state_dict().items():
            if "lora_" in name:
                continue
            state[name.replace(".base_layer.", ".")] = value
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}


def export(out_dir: Path, unet: torch.nn.Module, method: str, info: dict) -> Path:
    """Write ``unet.safetensors`` + ``finetune.json`` into ``out_dir`` (each file atomically)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / FINETUNE_WEIGHTS_FILE) as tmp:
        save_file(merged_state_dict(unet, method), str(tmp))
    with atomic_path(out_dir / FINETUNE_INFO_FILE) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return out_dir


def trainable_parameters(unet: torch.nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


def finetune_loss(backbone, z0: torch.Tensor, embeds, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The plain diffusion objective at z0's size (what the base model was trained with)."""
    scheduler = backbone.scheduler
    height, width = (s * backbone.spatial_factor for s in z0.shape[-2:])
    inputs = backbone.unet_inputs(embeds, height, width, do_cfg=False)
    pred = backbone.unet(scheduler.add_noise(z0, noise, t), t, **inputs, return_dict=False)[0]
    return F.mse_loss(pred.float(), prediction_target(scheduler, z0, noise, t).float())


def _settings(args: argparse.Namespace, model: str, size: int) -> dict:
    """What a run's weights depend on, stored in its checkpoint: a run resumed under other settings is refused."""
    return {"model": model, "method": args.method, "rank": args.rank if args.method == "lora" else None, "size": size,
            "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
            "caption_dropout": args.caption_dropout, "seed": args.seed,
            "data": None if args.data is None else str(args.data)}


def _encode(backbone, data: ImageCaptions, idx: torch.Tensor, dropped: torch.Tensor):
    with torch.no_grad():
        images = data.images[idx].to(backbone.device).float() / 255
        captions = ["" if d else data.captions[i] for i, d in zip(idx.tolist(), dropped.tolist())]
        prompts = backbone.stage_prompts(captions, *images.shape[-2:])  # as direct inference at this size reads them
        return backbone.encode(images), backbone.encode_prompt(prompts, None, 1, do_cfg=False)


def train(args: argparse.Namespace, data: ImageCaptions | None = None) -> dict:
    """Fine-tune (resuming from ``args.run_dir``'s checkpoint if any) until ``args.max_steps`` or for
    ``args.max_minutes``; returns the state."""
    from accelerate import Accelerator

    from ..pipeline import SelfCascadePipeline

    deadline = deadline_after(args.max_minutes)
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision or ("no" if cpu else "fp16"))
    device = accelerator.device
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bb = SelfCascadePipeline.from_pretrained(args.model, device=device, dtype=torch.float32).backbone
    for module in bb.modules():  # text encoder / VAE stay frozen; the UNet's trainable part is set below
        module.requires_grad_(False).eval()
    size = args.size or 2 * bb.base_size[0]
    if size % bb.size_multiple:
        raise ValueError(f"--size {size} is not a multiple of {bb.size_multiple} px, which this model needs.")
    if args.method == "lora":
        add_lora(bb.unet, args.rank)
    else:
        bb.unet.requires_grad_(True)
    unet = bb.unet.train()
    run_dir = Path(args.run_dir)
    settings = _settings(args, bb.name, size)
    ckpt = find_checkpoint(run_dir)
    state = {"step": 0, "train_seconds": 0.0, "losses": []}
    if ckpt is not None:
        state = read_checkpoint_state(ckpt)
        check_resume(state.get("settings"), settings, run_dir)
        trainable = load_file(str(ckpt / "trainable.safetensors"))
        unet.load_state_dict(trainable, strict=False)
        logger.info("resuming from %s at step %d", ckpt, state["step"])
    state["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    state["settings"] = settings
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if ckpt is not None:
        load_optimizer(optimizer, ckpt, state)
    state.pop("optimizer", None)
    data = data if data is not None else load_data(args.data, size)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    n_train, n_total = trainable_parameters(unet), sum(p.numel() for p in unet.parameters())
    info = {"base_model": bb.name, "method": args.method, "rank": args.rank if args.method == "lora" else None,
            "size": size, "trainable_parameters": n_train, "unet_parameters": n_total}
    logger.info("%s fine-tuning: %d trainable parameters (%.2f%% of the UNet) at %d px on %d images, batch %d",
                args.method, n_train, 100 * n_train / n_total, size, len(data), args.batch_size)

    def save(folder: Path) -> None:
        names = {n for n, p in accelerator.unwrap_model(unet).named_parameters() if p.requires_grad}
        tensors = {n: v.detach().cpu().contiguous() for n, v in accelerator.unwrap_model(unet).state_dict().items()
                   if n in names}
        save_file(tensors, str(folder / "trainable.safetensors"))

    num_t = bb.scheduler.config.num_train_timesteps

    def loss_fn(step: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        dropped = torch.rand(args.batch_size, generator=g) < args.caption_dropout
        t = torch.randint(0, num_t, (args.batch_size,), generator=g).to(device)
        z0, embeds = _encode(bb, data, idx, dropped)
        noise = torch.randn(z0.shape, generator=g).to(device, z0.dtype)
        with accelerator.autocast():
            return finetune_loss(bb, z0, embeds, t, noise)

    def snapshot(step: int) -> None:
        if args.snapshot_every and step % args.snapshot_every == 0:
            export(run_dir / "snapshots" / f"step-{step:06d}", accelerator.unwrap_model(unet), args.method,
                   {**info, "steps": step, "train_seconds": round(state["train_seconds"], 1)})

    loop = LoopConfig(run_dir, args.max_steps, args.lr, 0, args.grad_clip, args.checkpoint_every, args.log_every,
                      args.seed, f"finetune-{args.method}", deadline)
    train_loop(accelerator, unet, optimizer, loss_fn, loop, state, save, on_step=snapshot)
    step = state["step"]
    if accelerator.is_main_process:
        output = Path(args.output) if args.output else run_dir / "model"
        export(output, accelerator.unwrap_model(unet), args.method,
               {**info, "steps": step, "train_seconds": round(state["train_seconds"], 1)})
        logger.info("fine-tuned UNet saved to %s (step %d, loss %.4f)", output, step, state.get("loss", float("nan")))
    return state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    parser.add_argument("--method", choices=METHODS, default="full", help="every UNet weight, or LoRA adapters (peft)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (--method lora)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of images with NAME.txt captions, or a data set folder/manifest.jsonl "
                             "(default: the emoji data set cache, train split)")
    parser.add_argument("--size", type=int, default=None, help="target side in px (default: 2x the base side)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/finetune"), help="checkpoints and snapshots")
    parser.add_argument("--output", type=Path, default=None, help="final export folder (default RUN_DIR/model)")
    parser.add_argument("--max-steps", type=int, default=2000, help="train until this many steps in total")
    add_time_limit_argument(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="per process (same as train-upsamplers)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-5 full, 1e-4 LoRA")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="keeps classifier-free guidance working")
    add_trainer_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.lr is None:
        args.lr = 1e-5 if args.method == "full" else 1e-4
    train(args)
    return 0


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "finetune", "fine-tune the UNet at the target size (full or LoRA baselines)", __doc__,
                add_arguments, run)


if __name__ == "__main__":
    run_module("python -m selfcascade.baselines.finetune", __doc__, add_arguments, run)
