"""Shared pytest fixtures: tiny random-weight diffusers pipelines (see selfcascade.testing).

Session-scoped fixtures are shared by every test: do not mutate them (no new scheduler, no
hooks left behind, no weight changes, no ``.to(dtype)``). A test that needs to change a pipeline
takes a ``*_fresh`` fixture (built anew for that test; building costs ~0.1 s) or builds one with
``selfcascade.testing.make_tiny_sd(...)``.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from selfcascade.testing import make_tiny_sd, make_tiny_sdxl, save_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd():
    """Shared tiny SD 1.x/2.x pipeline (epsilon, seed 0, native 32x32 px). Read-only."""
    return make_tiny_sd(prediction_type="epsilon", seed=0)


@pytest.fixture(scope="session")
def tiny_sd_v():
    """Shared tiny SD 2.x-style v-prediction pipeline (seed 0, native 32x32 px). Read-only."""
    return make_tiny_sd(prediction_type="v_prediction", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Shared tiny SDXL pipeline (seed 0, native 32x32 px). Read-only."""
    return make_tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """Path of a saved tiny SD pipeline folder (same weights as ``tiny_sd``), for CLI/from_pretrained tests."""
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "pipe", prediction_type="epsilon", seed=0)


@pytest.fixture
def tiny_sd_fresh():
    """A new tiny SD pipeline (epsilon, seed 0) owned by this test: mutate freely."""
    return make_tiny_sd(prediction_type="epsilon", seed=0)


@pytest.fixture
def tiny_sdxl_fresh():
    """A new tiny SDXL pipeline (seed 0) owned by this test: mutate freely."""
    return make_tiny_sdxl(seed=0)


@pytest.fixture
def caption_folder(tmp_path):
    """Three random 72x80 images with NAME.txt captions beside them (a training folder for the trainers)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"red apple {i}")
    return folder


@pytest.fixture()
def minute_clock(monkeypatch):
    """The trainers' clock (``checkpoints.monotonic``) a minute later at each reading, for ``--max-minutes``;
    ``minute_clock.undo()`` gives the real clock back."""
    from selfcascade import checkpoints

    clock = itertools.count(0, 60)
    monkeypatch.setattr(checkpoints, "monotonic", lambda: next(clock))
    return monkeypatch
