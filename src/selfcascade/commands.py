"""Shared CLI wiring: argument parsers and types, model options, and the modules that are both a ``selfcascade``
subcommand and ``python -m`` scripts. Imports neither torch nor diffusers (``selfcascade --help`` stays fast)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .schedulers import SCHEDULER_NAMES

logger = logging.getLogger("selfcascade")

#: --dtype choices -> torch dtype names.
DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when its help already says it, nor for None or a flag's False."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def parse_seeds(text: str) -> list[int]:
    """'7' -> [7]; '0-3' -> [0, 1, 2, 3]; '1,5,9' -> [1, 5, 9]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.rsplit("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read seeds {text!r}: use 7, 0-3 or 1,5,9") from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"no seeds in {text!r}")
    return seeds


def read_prompts(path: str) -> list[str]:
    """--prompts FILE: one prompt per line, stripped, blank lines skipped (a caption list keeps its order)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"--prompts {path}: no such file") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path} holds no prompts (one per line)")
    return prompts


def parse_guidance(text: str) -> float | list[float]:
    """'7.5' -> 7.5; '7.5,5,3' -> one value per stage."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read guidance {text!r}: use 7.5 or 7.5,5,3 (one per stage)") from None
    return values[0] if len(values) == 1 else values


def parse_hw(text: str) -> int | tuple[int, int]:
    """'512' or '768x512' (HxW)."""
    try:
        if "x" in text:
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use 512 or 768x512 (HxW)") from None


def parse_positive_int(text: str) -> int:
    """'16' -> 16; zero, negatives and non-numbers are refused by argparse, before any model loads."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_model_args(p: argparse.ArgumentParser, video: bool = False) -> None:
    """Which model to load and how: shared by every command that samples."""
    if video:
        p.add_argument("--model", default="embedded-video",
                       help="'embedded-video' (the small video model shipped with selfcascade), a diffusers "
                            "text-to-video folder or hub id (TextToVideoSDPipeline, e.g. ali-vilab/text-to-video-ms-1.7b)")
    else:
        p.add_argument("--model", default="embedded",
                       help="'embedded' (the model shipped with selfcascade), a diffusers folder, a hub id, or a "
                            "single-file checkpoint (FILE.safetensors, as A1111 and ComfyUI use; see --config)")
    p.add_argument("--config", default=None,
                   help="single-file --model only: a diffusers folder (or hub id) of the same architecture whose "
                        "component configs are used; a local folder keeps loading offline")
    p.add_argument("--scheduler", default="ddim", type=str,
                   help=f"one of {', '.join(SCHEDULER_NAMES)} (A1111 spellings work: 'DPM++ 2M Karras', 'Euler a'); "
                        "'pipeline' keeps the model's own; default: ddim, the paper's")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="LoRA weights (a .safetensors file or folder diffusers' load_lora_weights reads), at SCALE "
                        "(default 1); repeat for several")
    p.add_argument("--vae", default=None, help="a diffusers VAE folder (or hub id) to use instead of the model's")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    p.add_argument("--unet-weights", default=None,
                   help="replace the UNet's weights by a `selfcascade finetune` export (full or LoRA baseline)")


def load_cascade(args: argparse.Namespace) -> Any:
    """The ``SelfCascadePipeline`` the options of ``add_model_args`` describe."""
    import torch

    from .pipeline import SelfCascadePipeline, default_device

    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, DTYPES[args.dtype]) if DTYPES[args.dtype] else None
    components: dict[str, Any] = {}
    if getattr(args, "vae", None):
        from diffusers import AutoencoderKL

        components["vae"] = AutoencoderKL.from_pretrained(args.vae)
    if getattr(args, "config", None):
        components["config"] = args.config
    cascade = SelfCascadePipeline.from_pretrained(args.model, device=device, dtype=dtype, scheduler=args.scheduler,
                                                  **components)
    for i, spec in enumerate(getattr(args, "lora", None) or []):
        from .loading import apply_lora

        pipe = getattr(cascade.backbone, "pipe", None)
        if pipe is None:
            raise ValueError(f"--lora needs a diffusers pipeline; {cascade.backbone.name} is not one.")
        apply_lora(pipe, spec, adapter_name=f"lora{i}")
    if args.unet_weights:
        from .loading import load_unet_weights

        info = load_unet_weights(cascade.backbone.unet, args.unet_weights, cascade.backbone.name)
        logger.info("UNet weights from %s (%s fine-tuning, %s steps)", args.unet_weights, info.get("method", "?"),
                    info.get("steps", "?"))
    return cascade

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], object]


def add_command(subparsers: "argparse._SubParsersAction", name: str, help: str, doc: str,
                add_arguments: AddArguments, run: Run) -> None:
    """Register ``name``; its --help shows the module docstring's first line and every default."""
    parser = subparsers.add_parser(name, help=help, description=doc.split("\n")[0], formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_trainer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options the accelerate-based trainers share: seed, loss log, checkpoints, snapshots, devices."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="record the loss curve every N steps")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="keep a copy every N steps in RUN_DIR/snapshots, for quality-over-steps curves (0: off)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: fp16 on GPU, none on CPU (where half precision is slower)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")


def add_time_limit_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-minutes``: a wall-clock budget for a trainer (``checkpoints.deadline_after``)."""
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop once this many minutes have passed since the command started (loading and "
                             "encoding data included), checkpointing where it stops; --max-steps still caps the run "
                             "(default: no time limit)")


def add_cooldown_argument(parser: argparse.ArgumentParser) -> None:
    """``--cooldown``: the learning rate's linear decay to 0 at --max-steps (``training.constant_lr``)."""
    parser.add_argument("--cooldown", type=int, default=0,
                        help="decay the learning rate linearly to 0 over the last this many steps before --max-steps; "
                             "may be set when resuming, to cool a run trained at a constant rate (default: 0, none)")


def run_module(prog: str, doc: str, add_arguments: AddArguments, run: Run, argv: Sequence[str] | None = None) -> None:
    """``python -m`` entry point with timestamped logging (long jobs run in the background)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0], formatter_class=HelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)


def train_or_export(args: argparse.Namespace, train: Run, export: Callable[[Path, Path], Path]) -> None:
    """A trainer's entry point: ``--export-only`` exports the run's latest checkpoint and exits, else train."""
    if not args.export_only:
        train(args)
        return
    if args.export is None:
        raise SystemExit("--export-only needs --export DIR")
    logging.getLogger(__name__).info("exported to %s", export(args.run_dir, args.export))
