"""``selfcascade data build`` and ``data clips``: the data set builders' command line.

It sits above both builders (``emoji_clips`` reads what ``emoji`` renders), so neither imports the other.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from . import emoji, emoji_clips

_CACHE_HELP = "default: $SELFCASCADE_CACHE or ~/.cache/selfcascade"


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.replace(",", " ").split()]


def _str_list(text: str) -> list[str]:
    return text.replace(",", " ").split()


def register_cli(subparsers: "argparse._SubParsersAction") -> None:
    """Add ``data build`` and ``data clips`` to a CLI's subparsers."""
    data = subparsers.add_parser("data", help="build the embedded emoji data set")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    build = data_sub.add_parser("build", help="fetch emoji SVGs with npm pack, render PNGs, write the manifest")
    build.add_argument("--cache-dir", type=Path, default=None, help=_CACHE_HELP)
    build.add_argument("--sizes", type=_int_list, default=list(emoji.DEFAULT_SIZES),
                       help="e.g. 32,64,128 (add 256 on demand)")
    build.add_argument("--sources", type=_str_list, default=list(emoji.SOURCES),
                       help=f"subset of {','.join(emoji.SOURCES)}")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--eval-fraction", type=float, default=0.15)
    build.add_argument("--min-eval-concepts", type=int, default=500, help="held-out concepts at least")
    build.add_argument("--limit", type=int, default=None,
                       help="only the first N SVGs of each source: a tiny data set for smoke tests")
    build.add_argument("--workers", type=int, default=2)
    build.set_defaults(func=_cmd_build)

    clips = data_sub.add_parser(
        "clips", help="render emoji motion clips (move, spin, bounce) with captions and true motion",
        description=emoji_clips.__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    clips.add_argument("--cache-dir", type=Path, default=None, help=_CACHE_HELP)
    clips.add_argument("--sizes", type=int, nargs="+", default=list(emoji_clips.DEFAULT_SIZES),
                       help="frame sides in px; the largest must be rendered already (selfcascade data build)")
    clips.add_argument("--frames", type=int, default=emoji_clips.DEFAULT_FRAMES, help="frames per clip")
    clips.add_argument("--count", type=int, default=300, help="clips to make")
    clips.add_argument("--split", choices=["train", "eval"], default="train",
                       help="emoji split the clips draw from (train clips never show eval emoji)")
    clips.add_argument("--motions", nargs="+", choices=list(emoji_clips.MOTIONS), default=list(emoji_clips.MOTIONS),
                       help="used in turn")
    clips.add_argument("--seed", type=int, default=0, help="picks the emoji order and every motion's parameters")
    clips.add_argument("--workers", type=int, default=1, help="processes rendering clips (same files for any count)")
    clips.set_defaults(func=_cmd_clips)


def _cmd_build(args: argparse.Namespace) -> None:
    emoji.build_dataset(args.cache_dir, sizes=args.sizes, sources=args.sources, seed=args.seed,
                        eval_fraction=args.eval_fraction, min_eval_concepts=args.min_eval_concepts,
                        workers=args.workers, limit=args.limit)


def _cmd_clips(args: argparse.Namespace) -> None:
    emoji_clips.build_clips(args.cache_dir, sizes=args.sizes, frames=args.frames, count=args.count,
                            split=args.split, motions=args.motions, seed=args.seed,
                            workers=args.workers)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m selfcascade.data.commands")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
