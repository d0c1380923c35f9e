"""Streaming scores: image sets read batch by batch give the numbers the whole set gives, one batch in memory."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from selfcascade.image_sets import ImageSet, file_set, folder_set
from selfcascade.metrics import EmojiFeatures, frechet_distance, sliced_wasserstein_distance
from selfcascade.metrics.emoji_features import EmojiFeatureNet, save_feature_net
from selfcascade.scoring import make_reference, score, style_adherence, summarise

STYLES = ["noto style", "twemoji style"]
BASE = 16


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> EmojiFeatures:
    """A random-init emoji network that knows two styles, so every column (style included) is computed."""
    torch.manual_seed(0)
    net = EmojiFeatureNet(num_concepts=2, num_styles=2, widths=(8, 16), input_size=16)
    folder = save_feature_net(net, tmp_path_factory.mktemp("extractor"), {"concepts": ["a", "b"], "styles": STYLES},
                              {"steps": 0})
    return EmojiFeatures(folder)


def _images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=size, mode="bilinear", align_corners=False)
    return (coarse + 0.05 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def _captions(n: int) -> list[str]:
    return [f"shape {i}, {STYLES[i % 2]}" for i in range(n)]


def _row(extractor: EmojiFeatures, fake: torch.Tensor, real: torch.Tensor, base: torch.Tensor, batch_size: int) -> dict:
    reference = make_reference(extractor, real, BASE, crops_per_image=3, seed=5, batch_size=batch_size)
    base_features = summarise(extractor, base, batch_size=batch_size).features
    return score(extractor, fake, reference, base_features, BASE, crops_per_image=3, seed=5, captions=_captions(7),
                 batch_size=batch_size)


def test_scores_do_not_depend_on_the_batch_size(extractor: EmojiFeatures) -> None:
    fake, real, base = _images(7, seed=0), _images(9, seed=1), _images(7, seed=2, size=BASE)
    whole = _row(extractor, fake, real, base, batch_size=100)
    counts = (whole["n_gen"], whole["n_real"], whole["n_gen_crops"], whole["n_real_crops"], whole["n_base"])
    assert counts == (7, 9, 21, 27, 7)
    assert all(whole[k] is not None for k in ("FID_r", "pFID_r", "FID_b", "SWD_x1e3", "style_acc"))
    for batch_size in (1, 3):
        row = _row(extractor, fake, real, base, batch_size)
        assert row.keys() == whole.keys()
        for key, value in whole.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    # the streamed columns are the whole-set metrics
    assert whole["FID_r"] == pytest.approx(frechet_distance(extractor(fake), extractor(real)), rel=1e-6)
    assert whole["SWD_x1e3"] == pytest.approx(1e3 * sliced_wasserstein_distance(fake, real, seed=5).mean, rel=1e-6)
    assert whole["style_acc"] == pytest.approx(extractor.style_adherence(fake, _captions(7)))
    assert style_adherence(extractor, fake, _captions(7), batch_size=2) == whole["style_acc"]


def _spied(images: torch.Tensor) -> tuple[ImageSet, dict]:
    """``images`` as a set whose reader checks that no batch it returned earlier is still alive when it reads."""
    log = {"reads": [], "alive": 0, "most_alive": 0}

    def released() -> None:
        log["alive"] -= 1

    def read(start: int, stop: int) -> torch.Tensor:
        log["most_alive"] = max(log["most_alive"], log["alive"])  # batches still held while the next is read
        batch = images[start:stop].clone()
        weakref.finalize(batch, released)
        log["alive"] += 1
        log["reads"].append((start, stop))
        return batch

    return ImageSet(images.shape[0], tuple(images.shape[2:]), read), log


def test_scoring_holds_one_batch_of_images_at_a_time(extractor: EmojiFeatures) -> None:
    fake, fake_log = _spied(_images(7, seed=0))
    real, real_log = _spied(_images(5, seed=1))
    reference = make_reference(extractor, real, BASE, crops_per_image=2, seed=0, batch_size=2)
    score(extractor, fake, reference, extractor(_images(7, seed=2, size=BASE)), BASE, 2, 0, _captions(7), batch_size=3)
    assert fake_log["reads"] == [(0, 3), (3, 6), (6, 7)] and real_log["reads"] == [(0, 2), (2, 4), (4, 5)]
    assert fake_log["most_alive"] == real_log["most_alive"] == 0  # each batch freed before the next read
    assert fake_log["alive"] == real_log["alive"] == 0  # and none kept by the summaries


def test_file_sets_read_lazily_and_check_sizes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8, 12, 3), dtype=np.uint8) for _ in range(3)]
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
    images = folder_set(tmp_path)
    assert (images.count, images.size) == (3, (8, 12))
    torch.testing.assert_close(images.read(1, 3), torch.from_numpy(np.stack(pixels[1:])).permute(0, 3, 1, 2) / 255)
    Image.new("RGB", (5, 5)).save(tmp_path / "3.png")
    with pytest.raises(ValueError, match="differ in size"):
        folder_set(tmp_path)  # from the headers, before any scoring
    with pytest.raises(ValueError, match="no images to score"):
        summarise(None, file_set([], size=(8, 8)))
