"""Result files: atomic writes, readable permissions, parameters in PNG text chunks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from selfcascade.io import save_png

SETTINGS = {
    "model": "m", "mode": "tuning-free", "height": 64, "width": 32, "steps": 5, "guidance_scale": [7.5, 3.0],
    "K": 700, "pivot_space": "latent", "scheduler": "DDIMScheduler", "stages": [[32, 16], [64, 32]],
    "prompt": ["a red apple"], "negative_prompt": ["blurry"],
}


def test_png_carries_parameters_and_settings(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (32, 64)), tmp_path / "sub" / "a.png", SETTINGS, seed=3)
    with Image.open(path) as im:
        text = im.text
    assert text["parameters"].splitlines()[:2] == ["a red apple", "Negative prompt: blurry"]
    assert "Seed: 3, Size: 32x64" in text["parameters"] and "Stages: 16x32 -> 32x64" in text["parameters"]
    assert "CFG scale: 7.5,3" in text["parameters"]
    assert json.loads(text["selfcascade"]) == {**SETTINGS, "seed": 3}


def test_file_mode_follows_umask_and_no_temp_file_is_left(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


class _BrokenImage:
    """Writes half a file, then fails, like a full disk or a killed process."""

    def save(self, f, **kwargs) -> None:
        f.write(b"\x89PNG partial")
        raise OSError("disk full")


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = save_png(Image.new("RGB", (4, 4), "red"), tmp_path / "a.png")
    before = path.read_bytes()
    with pytest.raises(OSError, match="disk full"):
        save_png(_BrokenImage(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]
