"""Temporal consistency of video self-cascade at 4x pixels (paper section 5.3) on the embedded video model.

    python benchmarks/eval_video.py --num-clips 32 --steps 25

Two protocols on the held-out emoji motion clips (``selfcascade data clips --split eval``: emoji never
used in training, each moved by a known affine):

* **upscale** (ground-truth motion): every method gets the real clip at the video model's base size (32 px
  for v2's pixel-space model, 128 px for v3's sibling) as its stage-0 result (``image=``) and makes the clip at
  twice that side. Then the true motion is known, so the *warping error* (mean
  |warp(frame t) - frame t+1| under the true motion, lower = moves as it should, no flicker) is exact;
  beside it the plain frame difference and the L1 error to the real clip at that size. Rows: bilinear
  upsampling (no model), the video model's tuning-free and tuned cascade, and the *image* model's
  tuned cascade applied to each frame alone (super-resolving frames, which the paper compares with).
* **generate** (text only): the captions of the same clips, generated at the base size (direct: the video model
  alone) and at twice the base side by direct inference, tuning-free and tuned. No ground truth exists, so only
  motion-free numbers: frame difference and the cosine similarity of consecutive frames' features
  (``selfcascade.metrics.features``, emoji CNN), beside the real clips' at the base size.

No offline video feature network exists here, so there is no FVD. Writes ``<results>/video_<model>.{md,csv}``
and a GIF of the first clips of every method. v2's numbers: ``--model embedded-video-v2 --results results/v2``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_inference import device_name, write_results
from selfcascade.backbones.base import resize_spatial
from selfcascade.data.emoji import default_cache_dir
from selfcascade.data.emoji_clips import clips_dir, read_motion
from selfcascade.io import save_video
from selfcascade.metrics.features import load_features
from selfcascade.metrics.temporal import frame_difference, warping_error
from selfcascade.pipeline import SelfCascadePipeline
from selfcascade.train_upsamplers import read_clip_frames

RESULTS = Path(__file__).resolve().parent / "results"


def load_clips(size: int, count: int, frames: int,
               split: str = "eval") -> tuple[torch.Tensor, list[str], list[torch.Tensor]]:
    """The first ``count`` clips of ``split`` at ``size``: frames [N, 3, F, S, S] in [0, 1], captions, motions."""
    folder = clips_dir(default_cache_dir(), size, split)
    metas = sorted(folder.glob("*.json"))[:count]
    if len(metas) < count:
        raise FileNotFoundError(f"{len(metas)} {split} clips at {size} px in {folder}; make them with "
                                f"`selfcascade data clips --split {split} --sizes {size // 2} {size} --count {count}`.")
    clips = [np.stack([np.asarray(f.convert("RGB")) for f in read_clip_frames(m.with_suffix(""), frames)]) for m in metas]
    pixels = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 255
    captions = [json.loads(m.read_text())["caption"] for m in metas]
    return pixels, captions, [read_motion(m)[:frames] for m in metas]


def frames_of(out) -> torch.Tensor:
    """A pipeline's pt output -> [N, 3, F, H, W] (videos come as [N, F, 3, H, W])."""
    return out.images.transpose(1, 2)


def feature_consistency(extractor, clip: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' features; ``clip`` [3, F, H, W] in [0, 1]."""
    feats = torch.nn.functional.normalize(extractor(clip.transpose(0, 1)).float(), dim=1)
    return (feats[1:] * feats[:-1]).sum(1).mean().item()


def image_model_for(video: SelfCascadePipeline, name: str | None) -> tuple[str, SelfCascadePipeline]:
    """``name``, or the shipped image model of the video model's base size (v3's for its sibling, v2's for v2's)."""
    base = video.backbone.base_size[0]
    for candidate in [name] if name else ["embedded", "embedded-v2"]:
        image = SelfCascadePipeline.from_pretrained(candidate)
        if image.backbone.base_size[0] == base:
            return candidate, image
    what = f"--image-model {name} samples" if name else "no shipped image model samples"
    raise ValueError(f"{what} at {base} px, the video model's base size: give as --image-model the image model the "
                     "video model was inflated from.")


def run(args: argparse.Namespace) -> list[dict]:
    video = SelfCascadePipeline.from_pretrained(args.model)
    args.image_model, image = image_model_for(video, args.image_model)
    frames, base = video.backbone.default_num_frames, video.backbone.base_size[0]
    size = 2 * base  # the protocols upscale base -> 2 x base
    low, captions, motions = load_clips(base, args.num_clips, frames)
    high, _, _ = load_clips(size, args.num_clips, frames)
    extractor = load_features("emoji")
    common = dict(num_inference_steps=args.steps, output_type="pt", progress=False)
    modes = {"tuning-free": {}}
    if args.bank or video.backbone.default_banks([(size, size)]):
        modes["tuned"] = {"upsamplers": args.bank}
    else:
        print(f"{args.model} has no shipped banks and no --bank was given: no tuned rows")
    rows, shown = [], {}

    def record(protocol: str, method: str, clips: torch.Tensor, seconds: float) -> None:
        warp = [warping_error(c.transpose(0, 1), m) for c, m in zip(clips, motions)] if protocol == "upscale" else []
        row = {
            "protocol": protocol, "method": method, "clips": len(clips),
            "warping_error": round(float(np.mean(warp)), 4) if warp else "",
            "frame_difference": round(float(np.mean([frame_difference(c.transpose(0, 1)) for c in clips])), 4),
            "feature_consistency": round(float(np.mean([feature_consistency(extractor, c) for c in clips])), 4),
            "l1_to_real": round((clips - high).abs().mean().item(), 4) if protocol == "upscale" else "",
            "s_per_clip": round(seconds / len(clips), 3),
        }
        rows.append(row)
        shown[f"{protocol}/{method}"] = resize_spatial(clips[: args.show], (size, size), "bilinear")  # one GIF grid
        print(row, flush=True)

    record("upscale", f"real {size} px", high, 0.0)
    start = time.perf_counter()
    bilinear = resize_spatial(low, (size, size), "bilinear")
    record("upscale", "bilinear", bilinear, time.perf_counter() - start)
    for mode, extra in modes.items():
        start, outs = time.perf_counter(), []
        for i, caption in enumerate(captions):
            outs.append(frames_of(video(caption, size, size, mode=mode, image=low[i : i + 1], seed=args.seed + i,
                                        **extra, **common)))
        record("upscale", f"video model, {mode}", torch.cat(outs), time.perf_counter() - start)
    start, outs = time.perf_counter(), []
    for i, caption in enumerate(captions):  # each frame upscaled alone by the image model: independent noise
        out = image([caption] * frames, size, size, mode="tuned", image=low[i].transpose(0, 1), seed=args.seed + i * frames,
                    **common).images
        outs.append(out.transpose(0, 1)[None])
    record("upscale", "image model per frame, tuned", torch.cat(outs), time.perf_counter() - start)

    record("generate", f"real {base} px", low, 0.0)
    start, outs = time.perf_counter(), []
    for i, caption in enumerate(captions):
        outs.append(frames_of(video(caption, base, base, mode="direct", seed=args.seed + i, **common)))
    record("generate", f"video model at {base} px (its base size)", torch.cat(outs), time.perf_counter() - start)
    for mode, extra in {"direct": {}, **modes}.items():
        start, outs = time.perf_counter(), []
        for i, caption in enumerate(captions):
            outs.append(frames_of(video(caption, size, size, mode=mode, seed=args.seed + i, **extra, **common)))
        record("generate", f"video model, {mode}", torch.cat(outs), time.perf_counter() - start)
    write(rows, shown, args, base)
    return rows


def write(rows: list[dict], shown: dict[str, torch.Tensor], args: argparse.Namespace, base: int) -> None:
    stem = args.results / f"video_{Path(args.model).name}"
    lines = [
        f"# Video self-cascade at 4x pixels ({args.model}, {base} -> {2 * base} px)", "",
        f"Device: {device_name(args.threads)}; torch {torch.__version__}. {args.num_clips} held-out emoji motion clips "
        f"(eval split), {args.steps} DDIM steps, the models' default guidance and K, seeds from {args.seed}. "
        f"Command: `python benchmarks/eval_video.py --model {args.model} --image-model {args.image_model} "
        f"--num-clips {args.num_clips} --steps {args.steps} --results {os.path.relpath(args.results, RESULTS.parent)}` (from `benchmarks/`). "
        "Warping error and L1 in [0, 1] pixel units (lower is better); feature consistency: cosine similarity "
        "of consecutive frames' emoji-CNN features (higher is steadier). See the script's docstring for the protocols.", "",
        "| protocol | method | clips | warping error | frame difference | feature consistency | L1 to real | s / clip |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['protocol']} | {r['method']} | {r['clips']} | {r['warping_error']} | {r['frame_difference']} | "
              f"{r['feature_consistency']} | {r['l1_to_real']} | {r['s_per_clip']} |" for r in rows]
    lines += ["", f"Clips (rows: methods as above; columns: the first {args.show} clips): ![clips]({stem.name}.gif)"]
    write_results(stem, rows, lines)
    write_clip_grid(shown, stem.with_suffix(".gif"))


def write_clip_grid(shown: dict[str, torch.Tensor], path: Path) -> None:
    """One GIF of clips [N, 3, F, S, S] per row (all of one size): a row per entry, a column per clip."""
    grid = torch.stack([torch.cat(list(clips), dim=-1) for clips in shown.values()])  # [M, 3, F, S, N*S]
    grid = torch.cat(list(grid), dim=-2)  # [3, F, M*S, N*S]
    save_video([Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
                for f in grid.transpose(0, 1)], path, fps=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded-video", help="video model (default: the shipped one)")
    parser.add_argument("--image-model", default=None,
                        help="image model of the video model's base size, for the per-frame baseline (default: the "
                             "shipped one of that size: embedded for v3's sibling, embedded-v2 for embedded-video-v2)")
    parser.add_argument("--bank", default=None, help="upsampler bank for the tuned rows (default: the model's shipped ones)")
    parser.add_argument("--num-clips", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=4, help="clips per row of the GIF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS / "v3", help="folder for the table and GIF")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run(args)


if __name__ == "__main__":
    main()
