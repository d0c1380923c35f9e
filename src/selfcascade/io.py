"""Writing results: atomic files, and PNGs, GIFs and MP4s that carry the parameters that made them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import numpy as np
from PIL import Image, PngImagePlugin


def parameters_text(settings: dict[str, Any], seed: int) -> str:
    """The A1111-style ``parameters`` chunk that other SD front-ends and image viewers read."""
    prompt = settings["prompt"][0] if settings.get("prompt") else ""
    lines = [prompt]
    negative = settings.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative[0]}")
    guidance = settings["guidance_scale"]
    lines.append(
        f"Steps: {settings['steps']}, Sampler: {settings['scheduler']}, CFG scale: "
        f"{','.join(f'{g:g}' for g in guidance)}, Seed: {seed}, Size: {settings['width']}x{settings['height']}, "
        f"Model: {settings['model']}, Mode: {settings['mode']}, K: {settings['K']}, "
        f"Pivot space: {settings['pivot_space']}, Stages: {' -> '.join(f'{w}x{h}' for h, w in settings['stages'])}"
    )
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, settings: dict[str, Any] | None = None,
             seed: int | None = None) -> Path:
    """Save atomically (temp file + rename) so an interrupted run never leaves a truncated PNG."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    if settings is not None:
        info.add_text("parameters", parameters_text(settings, seed if seed is not None else -1))
        info.add_text("selfcascade", json.dumps({**settings, "seed": seed}))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted write leaves the old one in place.
    ``suffix`` ends the temporary name, for writers that pick the format from it (ffmpeg).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; swapped in for ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        for child in tmp.rglob("*"):  # mkdtemp and save_pretrained may leave 0600 files
            child.chmod((0o777 if child.is_dir() else 0o666) & ~_umask())
        tmp.chmod(0o777 & ~_umask())
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------- video
#: Video outputs: GIF (Pillow), MP4 (the optional imageio + imageio-ffmpeg), or a folder of PNG frames ("").
VIDEO_SUFFIXES = (".gif", ".mp4", "")
MP4_INSTALL = "pip install imageio imageio-ffmpeg"


def check_video_output(path: str | os.PathLike) -> None:
    """Fail before sampling when ``path`` cannot be written: an unknown suffix, or .mp4 without its extra."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"cannot write a video to {path}: end it in .gif or .mp4, or give a folder for PNG frames.")
    if suffix == ".mp4":
        _imageio()


def _imageio() -> ModuleType:
    """imageio's v2 API, if imageio and its ffmpeg backend are installed (the optional ``video`` extra)."""
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio writes MP4 with)
    except ImportError:
        raise ValueError(f"reading or writing .mp4 needs imageio and imageio-ffmpeg: {MP4_INSTALL} (or pip install "
                         "'selfcascade[video]'), or use .gif instead.") from None
    return imageio


def save_video(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 8.0,
               settings: dict[str, Any] | None = None, seed: int | None = None) -> Path:
    """Write a clip as .gif, .mp4, or (a path without suffix) a folder of ``frame-NNNN.png``; atomically.

    The settings travel with the clip: GIF and MP4 comments, and each PNG frame's text chunks.
    """
    path = Path(path)
    check_video_output(path)
    if not frames:
        raise ValueError("cannot write a video without frames.")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    comment = json.dumps({**settings, "seed": seed}) if settings is not None else ""
    suffix = path.suffix.lower()
    if suffix == "":
        for i, frame in enumerate(frames):
            save_png(frame, path / f"frame-{i:04d}.png", settings, seed)
    elif suffix == ".gif":
        with atomic_path(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=list(frames[1:]),
                           duration=round(1000 / fps), loop=0, comment=comment)
    else:
        imageio = _imageio()
        with atomic_path(path, suffix=".mp4") as tmp:
            # macro_block_size=1: keep the exact size (the default pads to multiples of 16 by resizing).
            imageio.mimwrite(tmp, [np.asarray(f.convert("RGB")) for f in frames], format="FFMPEG", fps=fps,
                             macro_block_size=1, output_params=["-metadata", f"comment={comment}"])
    return path
