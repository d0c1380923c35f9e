"""Does the embedded video model follow motion words? Its clips, read back by ``selfcascade.metrics.motion``.

    python benchmarks/motion_adherence.py --num-clips 32 --steps 25 --threads 1

The emoji motion clips are captioned "<emoji caption>, <motion words>" ("moving up and left", "spinning
clockwise", "bouncing"; ``selfcascade data clips``). For the first N clips of each split (train: the emoji and
motions the model was trained on; eval: held-out emoji), the caption is generated at the video model's base size
(direct, a new seed per clip) and the motion reader names what each clip shows. Rows per split:

* **real clips**: the reader on the true clips, i.e. the reader's own accuracy;
* **caption**: the video model given the caption as written;
* **caption without its motion words**: what the model does unasked. A model that ignores motion words scores
  the same on both rows, so this row is the floor.

Columns: the share of clips whose read words equal the caption's (*words*), whose kind matches (translate,
rotate or bounce: *kind*), the words share within each kind (direction of travel, sense of spin, bouncing),
and the share read as standing still. Generated clips are cached as frame folders under ``--out``, so an
interrupted run resumes (with each clip's generation time); the clips are scored as saved (8-bit PNG frames).
Writes ``<results>/motion_adherence_<model>.{md,csv}``, every clip's words in ``..._clips.csv`` and a GIF.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_inference import device_name, write_results
from eval_video import frames_of, load_clips, write_clip_grid
from selfcascade.io import atomic_path, save_video
from selfcascade.metrics.motion import STILL_WORDS, motion_kind, motion_words
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.train_upsamplers import read_clip_frames

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("translate", "rotate", "bounce")


def split_caption(caption: str) -> tuple[str, str]:
    """"red apple, ..., noto style, moving right" -> ("red apple, ..., noto style", "moving right")."""
    head, words = caption.rsplit(", ", 1)
    motion_kind(words)  # raises on a caption that does not end in motion words
    return head, words


def to_frames(clip: torch.Tensor) -> list[Image.Image]:
    """[3, F, S, S] in [0, 1] -> F PIL frames."""
    array = (clip.transpose(0, 1).permute(0, 2, 3, 1).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in array]


def from_frames(frames: list[Image.Image]) -> torch.Tensor:
    """F PIL frames -> [3, F, S, S] in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(f.convert("RGB")) for f in frames])).permute(3, 0, 1, 2).float() / 255


def generated_clip(video: SelfCascadePipeline, caption: str, seed: int, folder: Path, steps: int) -> tuple[torch.Tensor, float]:
    """The base-size clip of ``caption`` at ``seed``, from ``folder`` when complete: (clip [3, F, S, S], seconds
    its generation took, kept in ``folder``/seconds.txt, written last)."""
    frames = video.backbone.default_num_frames
    record = folder / "seconds.txt"
    if not record.is_file():
        base = video.backbone.base_size[0]
        start = time.perf_counter()
        out = frames_of(video(caption, base, base, mode="direct", seed=seed, num_inference_steps=steps,
                              output_type="pt", progress=False))[0]
        seconds = time.perf_counter() - start
        save_video(to_frames(out), folder)
        with atomic_path(record) as tmp:
            tmp.write_text(f"{seconds:.3f}\n")
    return from_frames(read_clip_frames(folder, frames)), float(record.read_text())


def score(split: str, label: str, clips: list[torch.Tensor], asked: list[str]) -> tuple[dict, list[str]]:
    """One row: how often the words read off ``clips`` ([3, F, S, S] each) match the ``asked`` words."""
    read = [motion_words(c.transpose(0, 1)) for c in clips]
    hits = np.array([r == a for r, a in zip(read, asked)])
    row = {"split": split, "row": label, "clips": len(clips), "words": round(float(hits.mean()), 3),
           "kind": round(float(np.mean([motion_kind(r) == motion_kind(a) for r, a in zip(read, asked)])), 3)}
    for kind in KINDS:
        mine = [i for i, a in enumerate(asked) if motion_kind(a) == kind]
        row[f"{kind}_words"] = round(float(hits[mine].mean()), 3) if mine else ""
        row[f"{kind}_clips"] = len(mine)
    row["still"] = round(float(np.mean([r == STILL_WORDS for r in read])), 3)
    return row, read


def run(args: argparse.Namespace) -> list[dict]:
    video = SelfCascadePipeline.from_pretrained(args.model)
    frames, base = video.backbone.default_num_frames, video.backbone.base_size[0]
    rows, per_clip, shown = [], [], {}
    for split in args.splits:
        real, captions, _ = load_clips(base, args.num_clips, frames, split)
        heads, asked = zip(*(split_caption(c) for c in captions))
        variants = {"real clips": None, "caption": list(captions), "caption without its motion words": list(heads)}
        for label, prompts in variants.items():
            if prompts is None:
                clips, seconds = list(real), []
            else:
                made = [generated_clip(video, p, args.seed + i, args.out / Path(args.model).name / split / label.replace(" ", "-")
                                       / f"{i:04d}", args.steps) for i, p in enumerate(prompts)]
                clips, seconds = [c for c, _ in made], [s for _, s in made]
            row, read = score(split, label, clips, list(asked))
            row["s_per_clip"] = round(float(np.mean(seconds)), 2) if seconds else ""
            rows.append(row)
            per_clip += [{"split": split, "row": label, "clip": i, "asked": a, "read": r}
                         for i, (a, r) in enumerate(zip(asked, read))]
            shown[f"{split}/{label}"] = torch.stack(clips[: args.show])
            print(row, flush=True)
    write(rows, per_clip, shown, args, base)
    return rows


def write(rows: list[dict], per_clip: list[dict], shown: dict[str, torch.Tensor], args: argparse.Namespace,
          base: int) -> None:
    stem = args.results / f"motion_adherence_{Path(args.model).name}"
    lines = [
        f"# Motion words: does {args.model} follow them?", "",
        f"Device: {device_name(args.threads)}; torch {torch.__version__}. The first {args.num_clips} motion clips of "
        f"each split at {base} px, generated from their captions at the base size (direct, {args.steps} DDIM steps, "
        f"the model's default guidance, seeds from {args.seed}) and read back by `selfcascade.metrics.motion`. "
        f"Command: `python benchmarks/motion_adherence.py --model {args.model} --num-clips {args.num_clips} "
        f"--steps {args.steps} --splits {' '.join(args.splits)} --results "
        f"{os.path.relpath(args.results, RESULTS.parent)}` (from `benchmarks/`). *words*: share of clips whose read "
        "motion words equal the caption's; *kind*: share whose kind (translate, rotate, bounce) matches; per kind: "
        "the words share among clips asked for that kind (direction of travel, sense of spin, bouncing), with their "
        "count; *still*: share read as not moving. The real clips' row is the reader's own accuracy; the row without "
        "motion words is what the model does unasked (a model that ignores the words scores the same on both).", "",
        "| split | row | clips | words | kind | translate: direction | rotate: sense | bounce | still | s / clip |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def share(row: dict, kind: str) -> str:
        return f"{row[f'{kind}_words']:.0%} (of {row[f'{kind}_clips']})" if row[f"{kind}_clips"] else "-"

    lines += [f"| {r['split']} | {r['row']} | {r['clips']} | {r['words']:.0%} | {r['kind']:.0%} | {share(r, 'translate')} "
              f"| {share(r, 'rotate')} | {share(r, 'bounce')} | {r['still']:.0%} | {r['s_per_clip']} |" for r in rows]
    lines += ["", f"Every clip's asked and read words: [{stem.name}_clips.csv]({stem.name}_clips.csv). Clips (rows as "
              f"above, split by split; columns: the first {args.show} clips): ![clips]({stem.name}.gif)"]
    write_results(stem, rows, lines)
    with atomic_path(stem.with_name(stem.name + "_clips.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_clip[0]))
        writer.writeheader()
        writer.writerows(per_clip)
    write_clip_grid(shown, stem.with_suffix(".gif"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-video", help="video model (default: the shipped one)")
    parser.add_argument("--num-clips", type=int, default=32, help="clips per split")
    parser.add_argument("--splits", nargs="+", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1000, help="first seed (new seeds: not the clips' own)")
    parser.add_argument("--show", type=int, default=4, help="clips per row of the GIF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/motion_adherence"), help="cache of generated clips")
    parser.add_argument("--results", type=Path, default=RESULTS / "v3", help="folder for the table and GIF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
