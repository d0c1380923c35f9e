"""Serve a local web page: type a prompt, pick a size, compare the modes side by side (needs: pip install 'selfcascade[ui]').

    selfcascade ui                      # http://127.0.0.1:7860, the embedded model
    selfcascade ui --model ./my-sd-folder --port 8080

Every mode of ``selfcascade generate`` runs with one seed; each result shows its time, the cascade's stages
appear in a gallery, and every image is written as a PNG with the CLI's ``parameters`` chunk. Requests queue:
one generation at a time per model, so several tabs never collide.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

from ..commands import add_command, add_model_args, load_cascade
from ..plan import DEFAULT_MAX_RATIO


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)  # the model loaded at start (the page can switch: others get its device, dtype, scheduler)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 opens the page to every machine that can reach this one")
    parser.add_argument("--port", type=int, default=7860, help="port of the page")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/ui"), help="where every generated PNG goes")
    parser.add_argument("--max-ratio", type=float, default=DEFAULT_MAX_RATIO,
                        help="largest target/base pixel ratio accepted (guards memory and time)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="generations running at once across models (each model still runs one at a time)")


def run(args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {args.concurrency}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no usage reports to gradio's servers
    try:
        from .app import CSS, build
    except ImportError as exc:
        raise SystemExit(f"error: the web UI needs gradio ({exc.name} is missing): pip install 'selfcascade[ui]'") from None
    from .runner import ModelPool

    pool = ModelPool(partial(_load, args), max_ratio=args.max_ratio)
    pool.get(args.model)  # a bad --model fails here, with the CLI's error, instead of in the page
    demo = build(pool, args.output_dir, args.model, args.concurrency)
    demo.queue()
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(args.output_dir)],
                show_error=True, css=CSS)


def _load(args: argparse.Namespace, name: str) -> Any:
    """The command line's model with all its options; another one named in the page with its device, dtype and
    scheduler only (a LoRA, VAE or UNet export given for one model does not fit the others)."""
    options = vars(args) | {"model": name}
    if name != args.model:
        options |= {"config": None, "lora": None, "vae": None, "unet_weights": None}
    return load_cascade(argparse.Namespace(**options))


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    add_command(subparsers, "ui", "a local web page: prompt, size presets, modes side by side", __doc__,
                add_arguments, run)
