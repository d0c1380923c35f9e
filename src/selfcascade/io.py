"""Writing results: atomic files, and PNGs that carry the parameters that made them."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and an interrupted write leaves the old one in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
