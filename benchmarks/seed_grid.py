"""One prompt, several seeds, several models side by side: a grid that shows what a prompt usually gives.

A single image at seed 0 (the quickstart's) can be lucky or unlucky; a row of seeds per model shows the spread.
Each row is one model (LABEL=PATH, "embedded", or any folder ``SelfCascadePipeline.from_pretrained`` loads), each
column one seed, all at one size and mode; the same seeds for every model.

    python benchmarks/seed_grid.py --prompt "red apple" --model v3=embedded --model new=runs/v3-names \\
        --size 128 --mode direct --seeds 0-7 --output benchmarks/results/v3/red_apple_seeds.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from selfcascade import SelfCascadePipeline
from selfcascade.commands import parse_seeds
from selfcascade.grid import make_grid
from selfcascade.io import atomic_path
from selfcascade.modes import MODES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model", action="append", required=True,
                        help="a model: 'embedded', a folder, or LABEL=PATH (repeat for several rows)")
    parser.add_argument("--size", type=int, default=128, help="side in px")
    parser.add_argument("--mode", choices=MODES, default="direct")
    parser.add_argument("--seeds", type=parse_seeds, default=list(range(8)), help="7, 0-3 or 1,5,9")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cell", type=int, default=128, help="px per grid cell (images are resized to fit)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True, help="the grid's PNG")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows, labels = [], []
    for spec in args.model:
        label, path = spec.split("=", 1) if "=" in spec else (spec, spec)
        cascade = SelfCascadePipeline.from_pretrained(path, device="cpu")
        t0 = time.perf_counter()
        images = [cascade(args.prompt, args.size, args.size, mode=args.mode, num_inference_steps=args.steps,
                          seed=seed, progress=False).images[0] for seed in args.seeds]
        print(f"{label}: {len(images)} images in {time.perf_counter() - t0:.1f} s", flush=True)
        rows.append([im.resize((args.cell, args.cell), Image.LANCZOS) if im.width > args.cell else im for im in images])
        labels.append(label)
    grid = make_grid(rows, labels, [f"seed {s}" for s in args.seeds], cell=args.cell)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp:
        grid.save(tmp, format="PNG")
    print(f"wrote {args.output}: {args.prompt!r}, {args.mode} at {args.size} px, {args.steps} steps")


if __name__ == "__main__":
    main()
