"""Synthetic emoji motion clips (selfcascade.data.emoji_clips) on a hand-made emoji cache (no SVG renderer)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from selfcascade.cli import main
from selfcascade.data.emoji import MANIFEST, image_path
from selfcascade.data.emoji_clips import MOTIONS, build_clips, clips_dir, make_motion, read_motion
from selfcascade.metrics.images import resize_images
from selfcascade.metrics.temporal import temporal_consistency
from selfcascade.train_upsamplers import load_data

SPLITS = {"red-dot": "train", "blue-box": "train", "green-dot": "train", "pink-box": "train", "grey-dot": "eval",
          "teal-box": "eval"}
FRAMES = 5


def _emoji(name: str, size: int) -> Image.Image:
    """An emoji stand-in: a coloured disc or square with an off-centre mark, on white."""
    colour = {"red": "#e22", "blue": "#22e", "green": "#2a2", "pink": "#f6c", "grey": "#888", "teal": "#1aa"}
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    box = (size // 8, size // 8, size - size // 8, size - size // 8)
    (draw.ellipse if name.endswith("dot") else draw.rectangle)(box, fill=colour[name.split("-")[0]])
    draw.rectangle((size // 4, size // 4, size // 2, size // 3), fill="black")  # so that spins show
    return image


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    records = [{"id": name, "caption": f"{name.replace('-', ' ')}, test style", "split": split}
               for name, split in SPLITS.items()]
    (tmp_path / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    _render(tmp_path)
    return tmp_path


def _render(cache: Path) -> None:
    for size in (32, 64):
        for name in SPLITS:
            path = image_path(cache, size, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            _emoji(name, size).save(path)


def _frames(folder: Path) -> torch.Tensor:
    """[F, 3, S, S] float in [0, 1] of a clip's PNG frames."""
    arrays = [np.asarray(Image.open(p)) for p in sorted(folder.glob("frame-*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_clips_have_frames_captions_and_motion_at_every_size(cache):
    ids = build_clips(cache, sizes=[32, 64], frames=FRAMES, count=6, split="train")
    assert len(ids) == len(set(ids)) == 6
    assert {i.rsplit("-", 2)[1] for i in ids} == set(MOTIONS)
    for size in (32, 64):
        folder = clips_dir(cache, size, "train")
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(ids)
        for cid in ids:
            names = sorted(p.name for p in (folder / cid).iterdir())
            assert names == [f"frame-{i:04d}.png" for i in range(FRAMES)]
            assert Image.open(folder / cid / "frame-0000.png").size == (size, size)
            meta = json.loads((folder / f"{cid}.json").read_text())
            caption = (folder / f"{cid}.txt").read_text().strip()
            assert caption == meta["caption"] and caption.startswith(meta["emoji_id"].replace("-", " ") + ", test style, ")
            assert caption.endswith(("bouncing", "clockwise")) or ", moving " in caption
            assert SPLITS[meta["emoji_id"]] == "train" and meta["size"] == size and meta["rendered_at"] == 64
            assert read_motion(folder / f"{cid}.json").shape == (FRAMES, 2, 3)
    assert not any(p.name.startswith(".") for p in cache.rglob("*"))  # no temp files left


def test_eval_clips_use_only_eval_emoji(cache):
    ids = build_clips(cache, sizes=[32], frames=FRAMES, count=4, split="eval")
    emoji = {json.loads((clips_dir(cache, 32, "eval") / f"{cid}.json").read_text())["emoji_id"] for cid in ids}
    assert emoji == {"grey-dot", "teal-box"}  # 4 clips from 2 eval emoji: the second round takes the next seed
    assert len(set(ids)) == 4 and not clips_dir(cache, 32, "train").exists()


def test_deterministic_and_idempotent(cache, tmp_path_factory):
    ids = build_clips(cache, sizes=[32, 64], frames=FRAMES, count=3)
    files = sorted(p for p in (cache / "clips").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert build_clips(cache, sizes=[32, 64], frames=FRAMES, count=3) == ids
    assert [p.stat().st_mtime_ns for p in files] == stamps  # nothing rendered again
    assert build_clips(cache, sizes=[32, 64], frames=FRAMES, count=5)[:3] == ids  # more clips keep the first ones

    other = tmp_path_factory.mktemp("other_cache")
    (other / MANIFEST).write_text((cache / MANIFEST).read_text())
    _render(other)
    build_clips(other, sizes=[32, 64], frames=FRAMES, count=3, workers=2)  # processes render the same files
    for path in files:
        assert path.read_bytes() == (other / path.relative_to(cache)).read_bytes()


def test_small_clip_is_the_downsampled_large_one_and_follows_its_motion(cache):
    ids = build_clips(cache, sizes=[32, 64], frames=FRAMES, count=3)
    for cid in ids:
        big, small = _frames(clips_dir(cache, 64, "train") / cid), _frames(clips_dir(cache, 32, "train") / cid)
        assert (resize_images(big, 32) - small).abs().max() < 3 / 255  # the two renders' uint8 rounding
        theta = read_motion(clips_dir(cache, 64, "train") / f"{cid}.json")
        scores = temporal_consistency(big, theta)
        assert scores["warping_error"] < 0.01 and scores["frame_difference"] > 4 * scores["warping_error"]
        shuffled = big[torch.tensor([0, 3, 1, 4, 2])]
        assert temporal_consistency(shuffled, theta)["warping_error"] > 2 * scores["warping_error"]


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_keeps_the_emoji_in_view_and_depends_only_on_id_motion_seed(motion):
    a = make_motion("x", motion, 3, 8, side=64)
    assert np.array_equal(a.theta, make_motion("x", motion, 3, 8, side=64).theta)
    assert not np.array_equal(a.theta, make_motion("x", motion, 4, 8, side=64).theta)
    assert 0.45 <= a.emoji_scale <= 0.6 and (a.emoji_scale * 64) % 2 == 0  # whole pixels, centred exactly
    corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * a.emoji_scale  # the emoji's box on the canvas
    for theta in a.theta:  # carried into frame coordinates (theta maps frame -> canvas), it stays in the frame
        frame_points = np.linalg.solve(theta[:, :2], (corners - theta[:, 2]).T).T
        assert np.abs(frame_points).max() <= 1 + 1e-6


def test_clips_load_as_training_data(cache):
    ids = build_clips(cache, sizes=[32], frames=FRAMES, count=3)
    data = load_data(clips_dir(cache, 32, "train"), 32, frames=4)
    assert tuple(data.images.shape) == (3, 3, 4, 32, 32) and data.images.dtype == torch.uint8
    assert data.captions == [(clips_dir(cache, 32, "train") / f"{cid}.txt").read_text().strip() for cid in sorted(ids)]


def test_cli_and_clear_errors(cache, capsys):
    assert main(["data", "clips", "--cache-dir", str(cache), "--sizes", "32", "64", "--frames", "3", "--count", "2"]) == 0
    assert len(list(clips_dir(cache, 64, "train").glob("*.json"))) == 2
    assert main(["data", "clips", "--cache-dir", str(cache), "--sizes", "128", "--count", "1"]) == 2
    assert "run `selfcascade data build --sizes 128` first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown motions"):
        build_clips(cache, motions=["wobble"])


def test_video_training_reads_the_clips_with_cached_caption_embeddings(cache):
    import argparse

    from selfcascade import train_base

    parser = argparse.ArgumentParser()
    train_base.add_arguments(parser)
    args = parser.parse_args(["--cache-dir", str(cache), "--frames", "4"])
    with pytest.raises(FileNotFoundError, match="selfcascade data clips"):
        train_base._default_dataset(args)
    build_clips(cache, sizes=[32], frames=FRAMES, count=3)
    data = train_base._default_dataset(args)
    clips, hidden, mask = data.batch(torch.tensor([0, 2]))
    assert len(data) == 3 and clips.shape == (2, 3, 4, 32, 32) and -1 <= clips.min() < clips.max() <= 1
    assert hidden.shape == (2, 32, 384) and mask.shape == (2, 32) and mask[:, 0].all()
    assert any(cache.glob("captions_clips_*.safetensors"))  # embeddings cached for the next run
