"""Synthetic motion clips from the emoji data set: one emoji moving, spinning or bouncing over the background.

Video models need clips with captions to tune on and clips whose motion is known to be judged by
(``selfcascade.metrics.temporal``). Each clip is an emoji, shrunk onto the data set's background and moved
by a known per-frame affine, so its motion is exact at every size. A clip is rendered once at the largest
size asked for and downsampled (antialiased) to the others, so the small clip is exactly the
downsampled large one: the (high-res, low-res) pair the tuning objective assumes, with true 4x-pixel
ground truth. Everything about a clip follows from (emoji id, motion, seed): re-running re-creates it.

Layout under ``cache_dir`` (beside the emoji ``images/``), one folder per size and split::

    clips/<size>/<split>/<clip id>/frame-0000.png ...   the frames
    clips/<size>/<split>/<clip id>.txt                   caption: "<emoji caption>, <motion words>"
    clips/<size>/<split>/<clip id>.json                  motion: kind, emoji scale, per-frame theta, source

``clips/<size>/train`` is a clip folder ``selfcascade train-upsamplers --data`` reads as it is. Training
clips use only the train split's emoji, eval clips only the eval split's. ``theta`` follows the
convention in ``selfcascade.metrics.temporal`` (frame coordinates -> canvas coordinates).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..io import atomic_path, save_video
from ..metrics.images import resize_images
from ..metrics.motion import BOUNCE_WORDS, direction_words, spin_words
from ..metrics.temporal import affine_warp
from .emoji import BACKGROUND, default_cache_dir, image_path, read_manifest

logger = logging.getLogger(__name__)

CLIPS_DIR = "clips"
MOTIONS: tuple[str, ...] = ("translate", "rotate", "bounce")
DEFAULT_FRAMES = 8
DEFAULT_SIZES: tuple[int, ...] = (32, 64)
#: Side of the shrunk emoji as a fraction of the frame: small enough to move (or spin) inside it.
EMOJI_SCALE = (0.45, 0.6)


@dataclass(frozen=True)
class Motion:
    """One clip's ground-truth motion: ``theta`` [F, 2, 3] maps frame coordinates to canvas coordinates."""

    kind: str
    emoji_scale: float
    theta: np.ndarray
    words: str


def clip_id(emoji_id: str, motion: str, seed: int) -> str:
    return f"{emoji_id}-{motion}-{seed}"


def clips_dir(cache_dir: Path, size: int, split: str) -> Path:
    """The clip folder of one size and split (what ``--data`` of train-upsamplers takes)."""
    return Path(cache_dir) / CLIPS_DIR / str(size) / split


def _rng(emoji_id: str, motion: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{emoji_id}:{motion}:{seed}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _shift(cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """Affines that show the canvas moved by (cx, cy): frame(p) = canvas(p - c)."""
    theta = np.zeros((len(cx), 2, 3))
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2], theta[:, 1, 2] = -cx, -cy
    return theta


def make_motion(emoji_id: str, motion: str, seed: int, frames: int, side: int) -> Motion:
    """The deterministic motion of clip (emoji_id, motion, seed): parameters drawn from a hash of the three.

    translate: constant velocity along a random direction, the path centred in the frame;
    rotate: constant spin of 10-30 degrees per frame about the centre, starting upright;
    bounce: up and down off the bottom edge (|sin| arcs of 4-8 frames) at a fixed horizontal place.
    The emoji never leaves the frame. Its drawn scale is rounded so that, rendered at ``side`` px, it
    spans a whole number of pixels of the same parity as ``side`` (it sits exactly centred).
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; choose from {', '.join(MOTIONS)}.")
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {frames}.")
    rng = _rng(emoji_id, motion, seed)
    scale = (side - 2 * round(side * (1 - rng.uniform(*EMOJI_SCALE)) / 2)) / side
    room = 1 - scale  # how far the centre may go from the middle with the emoji still in view
    t = np.arange(frames)
    if motion == "translate":
        angle = rng.uniform(0, 2 * math.pi)
        distance = rng.uniform(1.0, 2.0) * room  # over the whole clip, centred: |c| <= room
        along = (t / (frames - 1) - 0.5) * distance
        dx, dy = math.cos(angle), math.sin(angle)
        return Motion(motion, scale, _shift(along * dx, along * dy), direction_words(dx, dy))
    if motion == "rotate":
        step = math.radians(rng.uniform(10, 30)) * rng.choice([-1, 1])
        alpha = t * step  # alpha > 0 turns the content clockwise on screen (y points down)
        theta = np.zeros((frames, 2, 3))
        theta[:, 0, 0] = theta[:, 1, 1] = np.cos(alpha)
        theta[:, 0, 1], theta[:, 1, 0] = np.sin(alpha), -np.sin(alpha)
        return Motion(motion, scale, theta, spin_words(step > 0))
    period = rng.uniform(4, 8)
    height = rng.uniform(1.0, 2.0) * room
    phase = rng.uniform(0, math.pi)
    x = rng.uniform(-0.5, 0.5) * room
    y = room - height * np.abs(np.sin(math.pi * t / period + phase))
    return Motion(motion, scale, _shift(np.full(frames, x), y), BOUNCE_WORDS)


def _canvas(emoji: Image.Image, scale: float) -> torch.Tensor:
    """The emoji shrunk (antialiased) to ``scale`` of its side, centred on the background: [3, S, S] in [0, 1]."""
    side = emoji.width
    inner = round(scale * side)
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    canvas.paste(emoji.convert("RGB").resize((inner, inner), Image.LANCZOS), ((side - inner) // 2,) * 2)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def render_clip(emoji: Image.Image, motion: Motion, sizes: Sequence[int]) -> dict[int, list[Image.Image]]:
    """The clip's frames at every size: warped at ``emoji``'s own size, then downsampled (antialiased).

    ``emoji`` is the square emoji render at the largest of ``sizes``.
    """
    if emoji.width != emoji.height or emoji.width != max(sizes):
        raise ValueError(f"render_clip needs the emoji rendered at the largest size {max(sizes)} px, "
                         f"got {emoji.width}x{emoji.height}.")
    canvas = _canvas(emoji, motion.emoji_scale)
    theta = torch.from_numpy(motion.theta).float()
    fill = BACKGROUND[0] / 255  # the background is grey-level (white): one value fills all channels
    big, _ = affine_warp(canvas.expand(len(theta), -1, -1, -1), theta, fill=fill)
    clips = {}
    for size in sizes:
        frames = big if size == emoji.width else resize_images(big, size)
        array = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        clips[size] = [Image.fromarray(a) for a in array]
    return clips


def read_motion(path: Path) -> torch.Tensor:
    """theta [F, 2, 3] of a clip's motion json (cut it to the frames a model made: ``theta[:n]``)."""
    return torch.tensor(json.loads(Path(path).read_text(encoding="utf-8"))["theta"], dtype=torch.float32)


def _ranked(records: list[dict], seed: int) -> list[dict]:
    """A seeded, stable order of emoji (adding emoji to the data set does not reshuffle the rest)."""
    return sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())


def _done(json_path: Path, frames: int, rendered_at: int) -> bool:
    """A clip is complete once its json (written last) exists with the frames asked for, from the same render.

    A clip rendered at another largest size is made again, so all sizes of a clip come from one render.
    """
    if not json_path.is_file():
        return False
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    return meta.get("frames") == frames and meta.get("rendered_at") == rendered_at


def _make_clip(task: tuple) -> bool:
    """Render one planned clip at the sizes it lacks (a pool task); True if anything was rendered."""
    cache_dir, record, motion_name, clip_seed, cid, sizes, frames, split = task
    cache_dir, largest = Path(cache_dir), sizes[-1]
    todo = [s for s in sizes if not _done(clips_dir(cache_dir, s, split) / f"{cid}.json", frames, largest)]
    if not todo:
        return False
    motion = make_motion(record["id"], motion_name, clip_seed, frames, largest)
    with Image.open(image_path(cache_dir, largest, record["id"])) as emoji:
        clips = render_clip(emoji, motion, sizes)
    caption = f"{record['caption']}, {motion.words}"
    meta = {"id": cid, "emoji_id": record["id"], "motion": motion_name, "seed": clip_seed, "split": split,
            "caption": caption, "frames": frames, "emoji_scale": motion.emoji_scale, "rendered_at": largest,
            "theta": motion.theta.round(8).tolist(),
            "convention": "theta[t] maps frame-t coords to canvas coords (torch affine_grid, normalised, "
                          "align_corners=False)"}
    for size in todo:
        folder = clips_dir(cache_dir, size, split)
        save_video(clips[size], folder / cid)
        with atomic_path(folder / f"{cid}.txt") as tmp:
            tmp.write_text(caption + "\n", encoding="utf-8")
        with atomic_path(folder / f"{cid}.json") as tmp:  # last: marks the clip complete
            tmp.write_text(json.dumps({**meta, "size": size}, indent=1) + "\n", encoding="utf-8")
    return True


def build_clips(cache_dir: Path | str | None = None, sizes: Sequence[int] = DEFAULT_SIZES, frames: int = DEFAULT_FRAMES,
                count: int = 300, split: str = "train", motions: Sequence[str] = MOTIONS, seed: int = 0,
                workers: int = 1) -> list[str]:
    """Render ``count`` clips of ``split``'s emoji at every size; returns their ids.

    Clip i shows emoji i of a seeded order of the split (wrapping round with the next clip seed) with
    motion i of ``motions``. Idempotent: clips already complete at a size are not rendered again. ``workers`` > 1
    renders on that many processes (one torch thread each); the files are the same either way.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    sizes = sorted({int(s) for s in sizes})
    if count < 1 or not sizes or sizes[0] < 1:
        raise ValueError(f"need a positive --count and positive --sizes, got count {count} and sizes {sizes}.")
    unknown = [m for m in motions if m not in MOTIONS]
    if unknown or not motions:
        raise ValueError(f"unknown motions {unknown or motions}; choose from {', '.join(MOTIONS)}.")
    records = _ranked([r for r in read_manifest(cache_dir) if r["split"] == split], seed)
    if not records:
        raise ValueError(f"no {split!r} emoji in the manifest under {cache_dir}; the splits are 'train' and 'eval'.")
    largest = sizes[-1]
    plan = []
    for i in range(count):
        record, motion = records[i % len(records)], motions[i % len(motions)]
        clip_seed = seed + i // len(records)
        plan.append((record, motion, clip_seed, clip_id(record["id"], motion, clip_seed)))
    missing = [r["id"] for r, *_ in plan if not image_path(cache_dir, largest, r["id"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} emoji are not rendered at {largest} px (e.g. {missing[0]}); run "
                                f"`selfcascade data build --sizes {largest}` first.")
    tasks = [(str(cache_dir), record, motion_name, clip_seed, cid, tuple(sizes), frames, split)
             for record, motion_name, clip_seed, cid in plan]
    bar = tqdm(total=len(tasks), desc=f"{split} clips at {','.join(map(str, sizes))} px", unit="clip", mininterval=2)
    made = 0
    if workers > 1 and len(tasks) > 1:
        with Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for rendered in pool.imap_unordered(_make_clip, tasks, chunksize=8):
                made += rendered
                bar.update()
    else:
        for task in tasks:
            made += _make_clip(task)
            bar.update()
    bar.close()
    logger.info("%d %s clips under %s (%d rendered now, %d already there)", len(plan), split,
                Path(cache_dir) / CLIPS_DIR, made, len(plan) - made)
    return [cid for *_, cid in plan]
