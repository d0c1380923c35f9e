"""`selfcascade evaluate` and the offline feature extractor: shapes, round trips, end-to-end tables, known cases."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfcascade import SelfCascadePipeline
from selfcascade.cli import main
from selfcascade import evaluate as evaluate_module
from selfcascade.evaluate import COLUMNS, GenerationSpec, choose_records, fill_set, generate_set
from selfcascade.metrics import EmojiFeatures, FeatureExtractorUnavailable, load_features
from selfcascade.metrics import features as features_module
from selfcascade.metrics.emoji_features import (DEFAULT_DIR, EmojiFeatureNet, caption_style, load_feature_net,
                                                save_feature_net)
from selfcascade.metrics.images import resize_images
from selfcascade.metrics.objects import count_objects, fill_holes, label_components
from selfcascade.metrics.train_features import augment, split_holdout
from selfcascade.testing import make_tiny_sd

SIZES = (32, 64)


def _tiny_net(seed: int = 0) -> EmojiFeatureNet:
    torch.manual_seed(seed)
    return EmojiFeatureNet(num_concepts=3, num_styles=2, widths=(8, 16), input_size=32)


@pytest.fixture(scope="module")
def extractor_dir(tmp_path_factory) -> Path:
    """A random-init extractor saved like the shipped one (no training in tests)."""
    folder = tmp_path_factory.mktemp("extractor")
    labels = {"concepts": ["a", "b", "c"], "styles": ["noto style", "twemoji style"]}
    return save_feature_net(_tiny_net(), folder, labels, {"steps": 0})


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory) -> Path:
    """A data-set cache as `selfcascade data build` lays it out: 2 train and 4 eval records, smooth random images."""
    cache = tmp_path_factory.mktemp("cache")
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(6):
        split = "train" if i < 2 else "eval"
        records.append({"id": f"img{i}", "source": "twemoji", "style": "twemoji style", "caption": f"shape {i}, twemoji style",
                        "label": f"shape {i}", "concept": f"shape{i}", "split": split})
        coarse = torch.rand(1, 3, 4, 4, generator=g)
        for size in SIZES:
            image = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
            path = cache / "images" / str(size) / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    (cache / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return cache


# --- the extractor ---------------------------------------------------------------------------------

def test_extractor_shape_determinism_and_round_trip(extractor_dir: Path) -> None:
    images = torch.rand(5, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    in_memory = EmojiFeatures.from_network(_tiny_net().eval(), "tiny")
    loaded = EmojiFeatures(extractor_dir)
    feats = loaded(images)
    assert feats.shape == (5, 16) and feats.dtype == torch.float32
    assert torch.equal(feats, loaded(images))  # deterministic
    assert torch.equal(loaded(images[:2]), feats[:2])  # per-image, whatever the batch
    torch.testing.assert_close(feats, in_memory(images), rtol=1e-2, atol=1e-3)  # fp16 storage
    assert loaded.name.startswith("selfcascade-emoji-cnn-16-") and loaded.input_size == 32
    net, config = load_feature_net(extractor_dir)
    assert not net.training and config["concepts"] == ["a", "b", "c"] and config["training"] == {"steps": 0}


def test_style_adherence_reads_the_caption_style(extractor_dir: Path) -> None:
    images = torch.rand(6, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    extractor = EmojiFeatures(extractor_dir)
    with torch.no_grad():
        _, _, logits = extractor.network(resize_images(images, 32))
    predicted = logits.argmax(1)
    names = ["noto style", "twemoji style"]
    captions = [f"shape {i}, {names[int(p)]}" for i, p in enumerate(predicted)]
    assert extractor.style_adherence(images, captions) == 1.0
    flipped = [f"shape {i}, {names[1 - int(p)]}" for i, p in enumerate(predicted)]
    assert extractor.style_adherence(images, flipped) == 0.0
    assert extractor.style_adherence(images, captions[:5] + ["a photo of a cat"]) is None  # no style named
    assert EmojiFeatures.from_network(_tiny_net(), "tiny").style_adherence(images, captions) is None  # no labels
    assert caption_style("Grinning Face, NOTO style ", names) == 0 and caption_style("noto style cat", names) is None


def test_extractor_keeps_training_mode_and_rejects_bad_input() -> None:
    net = _tiny_net().train()
    extractor = EmojiFeatures.from_network(net, "tiny")
    extractor(torch.rand(2, 3, 32, 32))
    assert net.training  # restored after the eval-mode pass
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        extractor(torch.rand(2, 32, 32))


def test_missing_extractor_folder_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_features"):
        EmojiFeatures(tmp_path)


def test_load_features_choice(extractor_dir: Path, monkeypatch) -> None:
    assert isinstance(load_features("emoji", extractor_dir), EmojiFeatures)
    assert isinstance(load_features("auto", extractor_dir), EmojiFeatures)  # a folder means the emoji network

    def unavailable(*args, **kwargs):
        raise FeatureExtractorUnavailable("no torch-fidelity here")

    monkeypatch.setattr(features_module, "InceptionFeatures", unavailable)
    with pytest.raises(FeatureExtractorUnavailable, match="torch-fidelity"):
        load_features("inception")
    if (DEFAULT_DIR / "model.safetensors").exists():
        assert load_features("auto").name.startswith("selfcascade-emoji-cnn-")  # falls back to the shipped weights
    with pytest.raises(ValueError, match="features must be one of"):
        load_features("pixels")


def test_augment_is_seeded_and_in_range() -> None:
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a = augment(images, 32, torch.Generator().manual_seed(3), blur_prob=0.5)
    b = augment(images, 32, torch.Generator().manual_seed(3), blur_prob=0.5)
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, augment(images, 32, torch.Generator().manual_seed(4), blur_prob=0.5))


def test_holdout_keeps_a_training_image_of_every_concept() -> None:
    records = [{"id": f"{c}{i}", "concept": c} for c in "abcdefghij" for i in range(1 + "abcdefghij".index(c) % 3)]
    train, held = split_holdout(records, 0.3, seed=0)
    assert held and len(train) + len(held) == len(records)
    assert {r["concept"] for r in train} == {r["concept"] for r in records}
    assert split_holdout(records, 0.3, seed=0) == (train, held)


def test_choose_records_is_seeded_and_prefix_stable() -> None:
    records = [{"id": i, "split": "eval" if i % 3 else "train"} for i in range(30)]
    assert choose_records(records, 5, 0) == choose_records(records, 8, 0)[:5]
    assert all(r["split"] == "eval" for r in choose_records(records, 8, 0))
    with pytest.raises(ValueError, match="eval split has 20"):
        choose_records(records, 21, 0)


# --- the object counter ----------------------------------------------------------------------------

def _discs(centres: list[tuple[float, float]], radius: float, side: int = 128, colour=(0.9, 0.7, 0.1),
           background=(1.0, 1.0, 1.0)) -> torch.Tensor:
    """One image [1, 3, side, side]: filled discs (centres and radius as fractions of the side) on a background."""
    y, x = np.mgrid[:side, :side] / side
    inside = np.zeros((side, side), bool)
    for cy, cx in centres:
        inside |= (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
    image = np.where(inside[..., None], colour, background).astype(np.float32)
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def test_object_counter_on_discs() -> None:
    one = _discs([(0.5, 0.5)], 0.3)
    three = _discs([(0.25, 0.25), (0.25, 0.75), (0.75, 0.5)], 0.15)
    blank = torch.ones(1, 3, 128, 128)
    assert count_objects(torch.cat([one, three, blank])) == [1, 3, 0]
    assert count_objects(_discs([(0.25, 0.25), (0.25, 0.75), (0.75, 0.5)], 0.15, side=512)) == [3]  # resized to 128
    assert count_objects(_discs([(0.5, 0.5)], 0.3, side=32)) == [1]
    dark = _discs([(0.3, 0.3), (0.7, 0.7)], 0.15, colour=(1.0, 1.0, 1.0), background=(0.1, 0.1, 0.2))
    assert count_objects(dark) == [2]  # the background is the border's colour, not white
    specks = _discs([(0.5, 0.5), (0.1, 0.1), (0.9, 0.9)], 0.03)  # 0.3% of the image each
    assert count_objects(specks, min_area=0.01) == [0] and count_objects(specks, min_area=0.001) == [3]


def test_object_counter_closes_a_thin_gap_and_fills_holes() -> None:
    cut = _discs([(0.5, 0.5)], 0.3)
    cut[..., 63, :] = 1.0  # a one-pixel white line through the disc
    assert count_objects(cut, closing=0) == [2]  # without the closing: two halves
    assert count_objects(cut) == [1]
    ring = _discs([(0.5, 0.5)], 0.35)
    ring[..., 24:104, 24:104] = torch.where(_discs([(0.5, 0.5)], 0.2)[..., 24:104, 24:104] < 1, 1.0,
                                            ring[..., 24:104, 24:104])  # white inside
    ring += _discs([(0.5, 0.5)], 0.08) - 1  # a dot in the white hole: a separate component, unless holes are filled
    assert count_objects(ring.clamp(0, 1)) == [1]


def test_score_counts_objects_of_both_sets(extractor_dir: Path) -> None:
    from selfcascade.scoring import make_reference, score

    extractor = EmojiFeatures(extractor_dir)
    one, three = _discs([(0.5, 0.5)], 0.3, side=64), _discs([(0.25, 0.25), (0.25, 0.75), (0.75, 0.5)], 0.15, side=64)
    fake, real = torch.cat([three, one, three, three]), torch.cat([one, one, one, three, one])
    reference = make_reference(extractor, real, 32, 2, seed=0, batch_size=2, count_objects=True)
    row = score(extractor, fake, reference, None, 32, 2, 0, batch_size=3, count_objects=True)
    assert (row["objects"], row["objects_gt1"], row["objects_real"], row["objects_gt1_real"]) == (2.5, 0.75, 1.4, 0.2)
    plain = score(extractor, fake, make_reference(extractor, real, 32, 2, seed=0, batch_size=2), None, 32, 2, 0,
                  batch_size=3)
    assert "objects" not in plain and plain == {k: row[k] for k in plain}  # nothing else moves
    assert score(extractor, fake, make_reference(extractor, real, 32, 2, seed=0), None, 32, 2, 0,
                 count_objects=True)["objects_real"] is None  # the reference was not counted


def test_labelling_connectivity() -> None:
    diagonal = np.eye(4, dtype=bool)
    assert label_components(diagonal)[1] == 1 and label_components(diagonal, diagonal=False)[1] == 4
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool)  # one U: the runs of row 0 join through row 2
    labels, count = label_components(u)
    assert count == 1 and set(np.unique(labels[u])) == {1} and not labels[~u].any()
    box = np.ones((5, 5), bool)
    box[2, 2] = False
    assert fill_holes(box).all() and not fill_holes(np.zeros((5, 5), bool)).any()
    box[2, 4] = box[2, 3] = False  # the hole now reaches the border: background
    assert not fill_holes(box)[2, 2]


# --- the command -----------------------------------------------------------------------------------

def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_end_to_end_and_resume(tiny_sd_dir: Path, fake_cache: Path, extractor_dir: Path, tmp_path: Path,
                                        capsys) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_sd_dir), "--modes", "direct", "tuning-free", "--sizes", "64",
            "--num-images", "2", "--num-real", "4", "--steps", "2", "--guidance", "1", "--features", "emoji",
            "--feature-weights", str(extractor_dir), "--cache-dir", str(fake_cache), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    rows = _read_csv(out / "results.csv")
    assert [r["mode"] for r in rows] == ["direct", "tuning-free"]
    for r in rows:
        assert list(r) == COLUMNS
        assert all(r[c] not in ("", "None") for c in COLUMNS if c != "peak_mib"), r
        assert r["peak_mib"] == ""  # generated on CPU: no number
        assert (r["n_gen"], r["n_real"], r["n_gen_crops"], r["n_real_crops"], r["n_base"]) == ("2", "4", "8", "16", "2")
        assert float(r["FID_r"]) >= 0 and float(r["KID_r_std"]) >= 0 and 0 <= float(r["style_acc"]) <= 1
        assert float(r["objects"]) >= 0 and 0 <= float(r["objects_gt1"]) <= 1
        assert float(r["objects"]) * 2 == int(float(r["objects"]) * 2)  # a mean over 2 images
        real = count_objects(torch.stack([torch.from_numpy(np.array(Image.open(fake_cache / "images" / "64" /
                                                                            f"img{i}.png"))).permute(2, 0, 1) / 255
                                          for i in range(2, 6)]))  # the 4 eval renders
        assert float(r["objects_real"]) == pytest.approx(sum(real) / 4)
        assert float(r["objects_gt1_real"]) == pytest.approx(sum(n > 1 for n in real) / 4)
    table = (out / "results.md").read_text()
    assert "selfcascade-emoji-cnn-16-" in table and "| 64 | 4x | tuning-free |" in table and "(2/4)" in table
    assert "(8/16)" in table and "(2/2)" in table
    assert "| objects | peak MiB |" in table and "Peak MiB:" in table and "Objects:" in table
    objects_cell = f"{float(rows[0]['objects']):.2f}, {100 * float(rows[0]['objects_gt1']):.0f}% (real "
    assert objects_cell in table and table.splitlines()[-2].endswith("| n/a |")  # peak: n/a on CPU
    assert Image.open(out / "grid_64.png").size[0] > 64
    meta = json.loads((out / "generated" / "tuning-free-64" / "meta.json").read_text())
    assert meta["generated"] == 2 and sorted(p.name for p in (out / "generated" / "tuning-free-64").glob("*.png")) == [
        "00000.png", "00001.png"]
    assert json.loads((out / "generated" / "direct-32" / "meta.json").read_text())["generated"] == 2  # base samples

    (out / "generated" / "direct-64" / "00001.png").unlink()  # an interrupted run: one image missing
    assert main(argv) == 0
    assert json.loads((out / "generated" / "direct-64" / "meta.json").read_text())["generated"] == 3  # only it redone
    assert json.loads((out / "generated" / "tuning-free-64" / "meta.json").read_text())["generated"] == 2
    again = _read_csv(out / "results.csv")
    assert [r["FID_r"] for r in again] == [r["FID_r"] for r in rows]  # same seeds, same pixels, same numbers

    steps = argv.index("--steps")
    assert main([*argv[:steps], "--steps", "3", *argv[steps + 2:]]) == 2  # other settings, same cache: refused
    assert "delete it or write to another --out" in capsys.readouterr().err


def test_missing_real_renders_fail_before_any_sampling(tiny_sd_dir: Path, fake_cache: Path, extractor_dir: Path,
                                                       tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tiny_sd_dir), "--modes", "direct", "--sizes", "128", "--num-images", "2",
            "--num-real", "4", "--steps", "2", "--features", "emoji", "--feature-weights", str(extractor_dir),
            "--cache-dir", str(fake_cache), "--out", str(out), "--no-progress"]
    assert not (fake_cache / "images" / "128").exists()
    assert main(argv) == 2
    assert "run `selfcascade data build --sizes 128`" in capsys.readouterr().err
    assert not (out / "generated").exists()  # nothing sampled, not even the base samples


def test_cached_images_of_other_weights_are_refused(tmp_path: Path) -> None:
    spec = GenerationSpec(model="tiny", mode="direct", size=32, steps=1, guidance=1.0, seed=0)
    first = SelfCascadePipeline.from_pipe(make_tiny_sd(seed=0))
    images, _ = generate_set(first, spec, ["red apple"], tmp_path / "direct-32", batch_size=1, progress=False)
    again, _ = generate_set(first, spec, ["red apple"], tmp_path / "direct-32", batch_size=1, progress=False)
    assert torch.equal(images, again)
    retrained = SelfCascadePipeline.from_pipe(make_tiny_sd(seed=1))  # same name and settings, other weights
    with pytest.raises(ValueError, match="other weights"):
        generate_set(retrained, spec, ["red apple"], tmp_path / "direct-32", batch_size=1, progress=False)


def test_generated_dir_identical_to_real_scores_zero(fake_cache: Path, extractor_dir: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("copy", "noisy"):
        (runs / name).mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for path in sorted((fake_cache / "images" / "64").glob("img[2-5].png")):  # the eval split's renders
        shutil.copy(path, runs / "copy" / path.name)
        image = torch.from_numpy(np.array(Image.open(path))).float() / 255
        noisy = (image + 0.3 * torch.randn(image.shape, generator=g)).clamp(0, 1)
        Image.fromarray((noisy.numpy() * 255).round().astype(np.uint8)).save(runs / "noisy" / path.name)
    out = tmp_path / "eval"
    assert main(["evaluate", "--generated", str(runs), "--base-size", "32", "--num-real", "4", "--features", "emoji",
                 "--feature-weights", str(extractor_dir), "--cache-dir", str(fake_cache), "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in _read_csv(out / "results.csv")}
    assert set(rows) == {"copy", "noisy"}
    copy, noisy = rows["copy"], rows["noisy"]
    # Random-init features are tiny, so compare with the degraded set rather than with absolute numbers.
    assert float(noisy["FID_r"]) > 0 and float(copy["FID_r"]) <= 1e-6 * float(noisy["FID_r"])
    assert float(copy["KID_r"]) < float(noisy["KID_r"])
    assert float(copy["SWD_x1e3"]) < float(noisy["SWD_x1e3"])
    assert copy["FID_b"] == "" and copy["n_base"] == "0"  # no --base-samples: n/a
    assert "n/a | n/a" in (out / "results.md").read_text()
    assert copy["objects"] == copy["objects_real"] and copy["objects_gt1"] == copy["objects_gt1_real"]  # same images
    assert copy["objects"] != "" and copy["peak_mib"] == ""  # not generated here: no peak memory

    photos = tmp_path / "photos"  # --real: objects are n/a (no plain background to count against)
    shutil.copytree(runs / "noisy", photos)
    assert main(["evaluate", "--generated", str(runs / "copy"), "--real", str(photos), "--base-size", "32",
                 "--num-real", "4", "--features", "emoji", "--feature-weights", str(extractor_dir),
                 "--cache-dir", str(fake_cache), "--out", str(tmp_path / "eval_real")]) == 0
    (row,) = _read_csv(tmp_path / "eval_real" / "results.csv")
    assert row["objects"] == row["objects_real"] == row["objects_gt1"] == "" and row["FID_r"] != ""
    assert "| n/a | n/a |" in (tmp_path / "eval_real" / "results.md").read_text()


class _FakeCascade:
    """Just what :func:`fill_set` calls: white 8 px images, on a backbone that claims a GPU."""

    def __init__(self, device: str) -> None:
        self.backbone = type("Backbone", (), {"device": torch.device(device), "name": "fake"})()
        self.batches: list[int] = []  # images per call

    def weights_fingerprint(self, *args) -> str:
        return "fake"

    def __call__(self, prompts, height, width, seed, **kwargs):
        self.batches.append(len(prompts))
        images = [Image.new("RGB", (width, height), "white") for _ in prompts]
        settings = {"guidance_scale": [1.0], "steps": 1, "scheduler": "fake", "width": width, "height": height,
                    "model": "fake", "mode": "direct", "K": 1, "pivot_space": "latent", "stages": [[height, width]]}
        return type("Output", (), {"images": images, "seeds": seed, "settings": settings})()


def test_fill_set_peak_memory_only_for_images_generated_on_a_gpu(tmp_path: Path, monkeypatch) -> None:
    peaks = iter([300 * 2**20, 500 * 2**20, 400 * 2**20])  # bytes, one per chunk
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    spec = GenerationSpec(model="fake", mode="direct", size=8, steps=1, guidance=1.0, seed=0)
    captions = ["a", "b", "c", "d", "e"]
    cascade = _FakeCascade("cuda:0")
    seconds, peak = fill_set(cascade, spec, captions, tmp_path / "gpu", batch_size=2, progress=False)
    assert len(cascade.batches) == 3 and len(resets) == 3 and resets[0] == torch.device("cuda:0")  # reset before each chunk
    assert peak == 500 and seconds >= 0  # the largest chunk's, in MiB
    assert fill_set(cascade, spec, captions, tmp_path / "gpu", batch_size=2, progress=False)[1] is None  # all cached
    assert fill_set(_FakeCascade("cpu"), spec, captions, tmp_path / "cpu", batch_size=2, progress=False)[1] is None
    assert len(resets) == 3  # nothing asked of CUDA on CPU
    assert evaluate_module.mib(499.6) == "500" and evaluate_module.mib(None) == "n/a"


def test_window_attention_reaches_the_cascade_and_keeps_its_own_cache(tmp_path: Path) -> None:
    class Recording(_FakeCascade):
        def __call__(self, prompts, height, width, seed, **kwargs):
            self.window = kwargs["window_attention"]
            return super().__call__(prompts, height, width, seed, **kwargs)

    plain = GenerationSpec(model="fake", mode="tuned", size=8, steps=1, guidance=1.0, seed=0)
    windowed = GenerationSpec(model="fake", mode="tuned", size=8, steps=1, guidance=1.0, seed=0, window_attention=True)
    assert "window_attention" not in plain.settings()  # folders cached before the option existed still match
    cascade = Recording("cpu")
    fill_set(cascade, windowed, ["a"], tmp_path / "set", batch_size=1, progress=False)
    assert cascade.window is True
    with pytest.raises(ValueError, match="other settings"):
        fill_set(cascade, plain, ["a"], tmp_path / "set", batch_size=1, progress=False)


def test_windowed_cascade_is_a_mode_of_its_own(tiny_sd_dir: Path, fake_cache: Path, extractor_dir: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_sd_dir), "--modes", "tuning-free", "tuning-free+window", "--sizes",
                 "64", "--num-images", "2", "--num-real", "4", "--steps", "2", "--guidance", "1", "--features", "emoji",
                 "--feature-weights", str(extractor_dir), "--cache-dir", str(fake_cache), "--out", str(out),
                 "--no-progress"]) == 0
    assert [r["mode"] for r in _read_csv(out / "results.csv")] == ["tuning-free", "tuning-free+window"]
    settings = json.loads((out / "generated" / "tuning-free+window-64" / "meta.json").read_text())["settings"]
    assert settings["mode"] == "tuning-free" and settings["window_attention"] is True
    assert "window_attention" not in json.loads((out / "generated" / "tuning-free-64" / "meta.json").read_text())[
        "settings"]
    with pytest.raises(SystemExit):
        main(["evaluate", "--modes", "direct+window", "--out", str(out)])  # only the cascade has a windowed variant


def test_generated_dir_errors(tmp_path: Path, fake_cache: Path, extractor_dir: Path) -> None:
    common = ["--base-size", "32", "--features", "emoji", "--feature-weights", str(extractor_dir),
              "--cache-dir", str(fake_cache), "--out", str(tmp_path / "eval")]
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--generated", str(tmp_path / "empty"), *common]) == 2  # "no images": exit 2, no traceback
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (64, 64)).save(mixed / "a.png")
    Image.new("RGB", (32, 32)).save(mixed / "b.png")
    assert main(["evaluate", "--generated", str(mixed), *common]) == 2


def _fake_emoji_cache(root: Path, count: int = 12) -> Path:
    """A data set cache of random 128 px "renders": 3 concepts x 2 styles, every third image in the eval split."""
    from selfcascade.data.emoji import MANIFEST, image_path

    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(count):
        record = {"id": f"e{i}", "split": "eval" if i % 3 == 2 else "train", "concept": f"c{i % 3}",
                  "style": f"s{i % 2}", "caption": f"c{i % 3}, s{i % 2} style"}
        pixels = torch.randint(0, 255, (128, 128, 3), generator=g, dtype=torch.uint8).numpy()
        path = image_path(root, 128, record["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        records.append(record)
    (root / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_feature_net_training_resumes_exactly_and_refuses_other_settings(tmp_path: Path, monkeypatch) -> None:
    from selfcascade.metrics import train_features

    monkeypatch.setattr(train_features, "export", lambda *a, **k: None)  # measures accuracy on a real data set
    cache = _fake_emoji_cache(tmp_path / "cache")

    def run(run_dir: Path, *extra: str) -> dict:
        parser = argparse.ArgumentParser()
        train_features.add_arguments(parser)
        return train_features.train(parser.parse_args(
            ["--run-dir", str(run_dir), "--cache-dir", str(cache), "--batch-size", "4", "--warmup", "2",
             "--widths", "4", "8", "--input-size", "32", "--holdout-fraction", "0.2", *extra]))

    straight = run(tmp_path / "a", "--max-steps", "6", "--checkpoint-every", "3")
    run(tmp_path / "b", "--max-steps", "3", "--checkpoint-every", "3")
    resumed = run(tmp_path / "b", "--max-steps", "6", "--checkpoint-every", "3")
    assert straight["step"] == resumed["step"] == 6
    a, b = (load_file(str(tmp_path / r / "checkpoint" / "model.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="lr: run has 0.002, now 0.001"):
        run(tmp_path / "a", "--max-steps", "8", "--lr", "1e-3")


def test_fill_set_batches_by_size_by_default_and_writes_after_each_call(tmp_path: Path) -> None:
    spec = GenerationSpec(model="fake", mode="direct", size=1024, steps=1, guidance=1.0, seed=0)
    cascade = _FakeCascade("cpu")
    fill_set(cascade, spec, list("abcdef"), tmp_path / "set", batch_size=None, progress=False)
    assert cascade.batches == [4, 2]  # four 1024 px images per call, as generate batches them
    assert len(list((tmp_path / "set").glob("*.png"))) == 6
