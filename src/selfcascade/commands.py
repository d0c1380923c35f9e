"""Shared wiring for modules that are both a ``selfcascade`` subcommand and ``python -m`` scripts."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], object]


def add_command(subparsers: "argparse._SubParsersAction", name: str, help: str, doc: str,
                add_arguments: AddArguments, run: Run) -> None:
    """Register ``name``; its --help shows the module docstring's first line and every default."""
    parser = subparsers.add_parser(name, help=help, description=doc.split("\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def run_module(prog: str, doc: str, add_arguments: AddArguments, run: Run, argv: Sequence[str] | None = None) -> None:
    """``python -m`` entry point with timestamped logging (long jobs run in the background)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)
