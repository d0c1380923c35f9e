"""The emoji data set builder on hand-written SVGs in fake npm tarballs (no network, no npm)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("resvg_py")

from selfcascade.data import emoji  # noqa: E402
from selfcascade.data.emoji import (  # noqa: E402
    PROMPT_FORMS, PackageFetchError, build_dataset, concept_key, fetch_package, image_path, make_caption, read_manifest,
)

RED_CIRCLE = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><circle cx="18" cy="18" r="12" fill="#f00"/></svg>'
BLUE_SQUARE = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36"><rect x="8" y="8" width="20" height="20" fill="#00f"/></svg>'
WIDE_BAR = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 36"><rect width="72" height="36" fill="#0f0"/></svg>'
BROKEN = "this is not an svg"

EMOJIBASE = [
    {"label": "red circle", "hexcode": "1F534", "tags": ["circle", "geometric", "red"]},
    {"label": "blue square", "hexcode": "1F7E6", "tags": ["blue", "square"]},
    {"label": "waving hand", "hexcode": "1F44B", "tags": ["hand", "wave"],
     "skins": [{"label": "waving hand: dark skin tone", "hexcode": "1F44B-1F3FF"}]},
]


def _tarball(path: Path, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def cache(tmp_path: Path) -> Path:
    """A cache whose packages/ already holds fake tarballs, so fetch_package never runs npm."""
    packages = tmp_path / "packages"
    packages.mkdir()
    _tarball(packages / "twemoji-svg-15.0.0.tgz", {
        "1f534.svg": RED_CIRCLE, "1f7e6.svg": BLUE_SQUARE, "1f44b-1f3ff.svg": WIDE_BAR, "1f44b.svg": BROKEN,
    })
    _tarball(packages / "emojibase-data-17.0.0.tgz", {"en/data.json": json.dumps(EMOJIBASE)})
    openmoji = [{"hexcode": "1F534", "annotation": "red circle", "tags": "circle, red", "openmoji_tags": ""},
                {"hexcode": "1F44B", "annotation": "waving hand", "tags": "hand", "openmoji_tags": ""}]
    _tarball(packages / "openmoji-17.0.0.tgz", {
        "data/openmoji.json": json.dumps(openmoji), "color/svg/1F534.svg": RED_CIRCLE, "color/svg/1F44B.svg": BLUE_SQUARE,
    })
    return tmp_path


def _build(cache: Path, **kw) -> list[dict]:
    build_dataset(cache, sizes=(32, 64), sources=("openmoji", "twemoji"), eval_fraction=0.5,
                  min_eval_concepts=1, workers=1, **kw)
    return read_manifest(cache)


def test_build_renders_captions_and_skips_broken(cache: Path) -> None:
    records = _build(cache)
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {"twemoji-1f534", "twemoji-1f7e6", "twemoji-1f44b-1f3ff", "openmoji-1F534", "openmoji-1F44B"}
    assert by_id["twemoji-1f534"]["caption"] == "red circle, geometric, twemoji style"
    assert by_id["twemoji-1f44b-1f3ff"]["concept"] == by_id["openmoji-1F44B"]["concept"] == "wavinghand"
    sidecar = json.loads((cache / "dataset.json").read_text())
    assert sidecar["skipped_render_failures"] == 1
    assert sidecar["licenses"]["openmoji"]["license"] == "CC BY-SA 4.0"
    for size in (32, 64):
        image = np.asarray(Image.open(image_path(cache, size, "twemoji-1f534")))
        assert image.shape == (size, size, 3)
        assert tuple(image[0, 0]) == (255, 255, 255)  # white background
        assert tuple(image[size // 2, size // 2]) == (255, 0, 0)
    wide = np.asarray(Image.open(image_path(cache, 32, "twemoji-1f44b-1f3ff")))
    assert tuple(wide[16, 16]) == (0, 255, 0) and tuple(wide[0, 16]) == (255, 255, 255)  # fitted, centred


def test_split_is_by_concept_and_seeded(cache: Path) -> None:
    records = _build(cache)
    split_of: dict[str, set[str]] = {}
    for r in records:
        split_of.setdefault(r["concept"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    assert {"train", "eval"} == {s.pop() for s in split_of.values()}
    assert emoji.split_concepts(["a", "b", "c", "d"], 0.5, 1, seed=0) == emoji.split_concepts(["d", "c", "b", "a"], 0.5, 1, seed=0)
    assert len(emoji.split_concepts([str(i) for i in range(1000)], 0.1, 500, seed=0)) == 500


def test_build_is_idempotent(cache: Path) -> None:
    _build(cache)
    png = image_path(cache, 32, "twemoji-1f534")
    stamp = png.stat().st_mtime_ns
    first = (cache / "manifest.jsonl").read_text()
    _build(cache)
    assert png.stat().st_mtime_ns == stamp
    assert (cache / "manifest.jsonl").read_text() == first


def test_slim_packages_render_the_same_data_set(cache: Path, tmp_path: Path) -> None:
    openmoji = cache / "packages" / "openmoji-17.0.0.tgz"
    with tarfile.open(openmoji) as tar:
        files = {m.name.removeprefix("package/"): tar.extractfile(m).read().decode() for m in tar if m.isfile()}
    _tarball(openmoji, {**files, "black/svg/1F534.svg": BLUE_SQUARE, "README.md": "not read"})
    slim = tmp_path / "slim"
    written = emoji.slim_packages(cache / "packages", slim / "packages", sources=("openmoji", "twemoji"))
    assert sorted(p.name for p in written) == ["emojibase-data-17.0.0.tgz", "openmoji-17.0.0.tgz",
                                               "twemoji-svg-15.0.0.tgz"]
    with tarfile.open(slim / "packages" / "openmoji-17.0.0.tgz") as tar:
        assert sorted(tar.getnames()) == ["package/color/svg/1F44B.svg", "package/color/svg/1F534.svg",
                                          "package/data/openmoji.json"]
    assert _build(slim) == _build(cache)


def test_cli_limit_renders_the_first_svgs_of_each_source(cache: Path) -> None:
    from selfcascade.cli import main

    assert main(["data", "build", "--cache-dir", str(cache), "--sources", "openmoji,twemoji", "--sizes", "32",
                 "--limit", "1", "--min-eval-concepts", "1", "--workers", "1"]) == 0
    records = read_manifest(cache)
    assert sorted(r["id"] for r in records) == ["openmoji-1F534", "twemoji-1f534"]
    assert {r["split"] for r in records} == {"eval"}  # 15% of one concept, at least one held out


def test_npm_failure_names_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "npm ERR! network")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(PackageFetchError, match=r"openmoji@17\.0\.0.*npm registry"):
        fetch_package("openmoji", "17.0.0", tmp_path)


def test_concept_key_and_caption() -> None:
    assert concept_key("waving hand: medium-dark skin tone") == concept_key("waving hand") == "wavinghand"
    assert concept_key("person merpeople medium dark skin tone") == "personmerpeople"
    assert concept_key("one o’clock") == concept_key("one oclock")
    assert make_caption("grinning face", ("face", "smile", "happy", "grin"), "noto") == "grinning face, smile, happy, noto style"


def test_prompt_forms_cut_a_caption_to_the_name_and_style_people_type() -> None:
    record = {"caption": make_caption("red apple", ("fruit",), "noto"), "label": "red apple", "style": "noto style"}
    assert {form: cut(record) for form, cut in PROMPT_FORMS.items()} == {
        "caption": "red apple, fruit, noto style", "name": "red apple", "name_style": "red apple, noto style"}


class _FakeEncoder:
    """Deterministic stand-in for MiniLM: keeps the loader test fast."""

    max_length = 4

    def encode(self, texts):
        hidden = torch.stack([torch.full((4, 384), float(len(t))) for t in texts])
        mask = torch.tensor([[True, bool(t), False, False] for t in texts])
        return hidden, mask


def test_loader_batches_images_and_embeddings(cache: Path) -> None:
    from selfcascade.data.loader import EmojiDataset

    records = _build(cache)
    train = EmojiDataset(cache, size=32, split="train", max_length=4, encoder=_FakeEncoder())
    assert len(train) == sum(r["split"] == "train" for r in records)
    images, hidden, mask = train.batch(torch.arange(len(train)))
    assert images.shape == (len(train), 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert hidden.shape == (len(train), 4, 384) and hidden.dtype == torch.float32
    for i, r in enumerate(train.records):
        assert hidden[i, 0, 0] == len(r["caption"])
    uncond_hidden, uncond_mask = train.uncond()
    assert uncond_hidden.shape == (4, 384) and uncond_mask.tolist() == [True, False, False, False]
    with pytest.raises(FileNotFoundError, match="data build --sizes 128"):
        EmojiDataset(cache, size=128, split="train", max_length=4, encoder=_FakeEncoder())


def test_zoomed_windows_are_crops_of_the_2x_rendering(cache: Path) -> None:
    from selfcascade.data.loader import EmojiDataset

    _build(cache)
    train = EmojiDataset(cache, size=32, split="train", max_length=4, encoder=_FakeEncoder())
    idx = torch.tensor([0, len(train) - 1, 0])
    crops = train.zoomed(idx, torch.Generator().manual_seed(0))
    assert crops.shape == (3, 3, 32, 32) and crops.min() >= -1 and crops.max() <= 1
    again = train.zoomed(idx, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    big = train.zoom_images[2][0].float() / 127.5 - 1  # [3, 64, 64]
    windows = big.unfold(1, 32, 1).unfold(2, 32, 1)  # [3, 33, 33, 32, 32]
    assert any(torch.equal(windows[:, y, x], crops[0]) for y in range(33) for x in range(33))
    with pytest.raises(FileNotFoundError, match="data build --sizes 128"):
        train.zoomed(idx, torch.Generator(), zoom=4)
