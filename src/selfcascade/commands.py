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


def run_module(prog: str, doc: str, add_arguments: AddArguments, run: Run, argv: Sequence[str] | None = None) -> None:
    """``python -m`` entry point with timestamped logging (long jobs run in the background)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(args)
