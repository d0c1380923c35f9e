"""The cascade on a model trained with a scale cue, with and without the cue, beside direct inference.

For each prompt and size: direct inference, the tuning-free cascade with the model's scale cue (each stage's
prompt ends in its zoom's words, e.g. ", 2x zoom"), and the same cascade with the cue switched off; one seed,
timed side by side in one process (s / image). Writes a grid and a table:

    python benchmarks/scale_cue.py --model runs/v3 --sizes 256 512 --output benchmarks/results/v3/scale_cue
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from selfcascade import SelfCascadePipeline
from selfcascade.grid import make_grid
from selfcascade.io import atomic_path

PROMPTS = ("grinning face, cheerful, cheery, twemoji style", "red apple, fruit, twemoji style")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder whose selfcascade.json declares a zoom cue")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True, help="path stem of the .md table and .png grid")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cascade = SelfCascadePipeline.from_pretrained(args.model, device="cpu")
    cue = cascade.backbone.zoom_cue
    if not cue:
        raise SystemExit(f"{args.model} declares no zoom cue (selfcascade.json): nothing to compare.")
    cascade(args.prompts[0], *cascade.backbone.base_size, num_inference_steps=2, progress=False)  # warm-up, untimed
    runs = {"direct": ("direct", cue), "tuning-free, cue": ("tuning-free", cue), "tuning-free, no cue": ("tuning-free", None)}
    rows, cells, labels = [], [], []
    for prompt in args.prompts:
        for label, (mode, zoom_cue) in runs.items():
            cascade.backbone.zoom_cue = zoom_cue
            row = []
            for size in args.sizes:
                t0 = time.perf_counter()
                image = cascade(prompt, size, size, mode=mode, num_inference_steps=args.steps, seed=args.seed,
                                progress=False).images[0]
                rows.append((prompt, label, size, time.perf_counter() - t0))
                row.append(image)
            cells.append(row)
            labels.append(f"{prompt.split(',')[0][:14]} / {label}")
    cascade.backbone.zoom_cue = cue

    args.output.parent.mkdir(parents=True, exist_ok=True)
    grid_path = args.output.with_suffix(".png")
    with atomic_path(grid_path, ".png") as tmp:
        make_grid(cells, labels, [f"{s} px" for s in args.sizes], cell=max(args.sizes) // 2).save(tmp)
    lines = [f"# The cascade with and without the scale cue: {args.model}", "",
             f"Cue `{cue}`; seed {args.seed}, {args.steps} DDIM steps, the model's default K and guidance, CPU "
             f"({args.threads} threads), one image per cell, timed in one process.", "",
             "| prompt | method | size | s / image |", "|---|---|---|---|",
             *(f"| {p} | {m} | {s} | {t:.1f} |" for p, m, s, t in rows), "", f"![grid]({grid_path.name})", ""]
    with atomic_path(args.output.with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
