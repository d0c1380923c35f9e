"""Direct vs tuning-free (vs tuned) on the embedded model's eval split, as committed benchmark results.

    python benchmarks/eval_modes.py --sizes 64 128 256 --num-images 64 --steps 50

A thin wrapper of ``selfcascade evaluate`` (same options, see its --help): it evaluates into
``runs/eval_<model>/`` (git-ignored, where the generated images are cached so a run can resume),
then copies the tables and grids to ``benchmarks/results/eval_<model>/``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from selfcascade.evaluate import add_arguments, evaluate

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.set_defaults(out=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = Path(args.model).name
    args.out = args.out or f"runs/eval_{name}"
    evaluate(args)
    dest = RESULTS / f"eval_{name}"
    dest.mkdir(parents=True, exist_ok=True)
    for path in Path(args.out).glob("*.*"):  # results.md, results.csv, grid_<size>.png; not generated/
        shutil.copy(path, dest / path.name)
    print(f"results in {dest}")


if __name__ == "__main__":
    main()
