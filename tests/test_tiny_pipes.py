"""The tiny offline pipelines that the rest of the suite builds on actually work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from selfcascade.testing import BASE_PX, SIZE_MULTIPLE, TINY_VOCAB_SIZE, make_tiny_sd, make_tiny_sdxl, make_tiny_tokenizer

PROMPT = "a red apple"


def _run(pipe, seed=0, **kw):
    kw.setdefault("height", BASE_PX)
    kw.setdefault("width", BASE_PX)
    return pipe(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kw).images


def test_tokenizer_offline_and_clip_like():
    tok = make_tiny_tokenizer()
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.model_max_length == 77
    enc = tok(PROMPT, padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc.input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id
    n = sum(enc.attention_mask)
    assert ids[n - 1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1 : n - 1]  # every piece of the prompt is in the vocab
    assert tok.decode(ids, skip_special_tokens=True).strip() == PROMPT
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "red</w>", "apple</w>"]  # merges apply
    # any text tokenizes (byte-level), never to <unk>
    odd = tok("Çà ne 2+2 ✓ 🍎").input_ids
    assert tok.unk_token_id not in odd[1:-1]
    assert make_tiny_tokenizer(pad_token="!").pad_token == "!"


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_sd_v", "tiny_sdxl"])
def test_native_size_two_steps(fixture, request):
    pipe = request.getfixturevalue(fixture)
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == BASE_PX
    n_down = len(pipe.unet.config.down_block_types)
    assert SIZE_MULTIPLE == pipe.vae_scale_factor * 2 ** (n_down - 1)
    img = _run(pipe)
    assert img.shape == (1, BASE_PX, BASE_PX, 3)
    assert np.isfinite(img).all()
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert img.std() > 0.01  # not a constant image
    # same generator -> same image
    np.testing.assert_array_equal(img, _run(pipe))


def test_prediction_type_and_scheduler(tiny_sd, tiny_sd_v):
    for pipe, pred in ((tiny_sd, "epsilon"), (tiny_sd_v, "v_prediction")):
        cfg = pipe.scheduler.config
        assert type(pipe.scheduler).__name__ == "DDIMScheduler"
        assert cfg.prediction_type == pred
        assert (cfg.num_train_timesteps, cfg.beta_schedule, cfg.set_alpha_to_one, cfg.steps_offset) == (
            1000,
            "scaled_linear",
            False,
            1,
        )


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = make_tiny_sd(seed=0).unet.state_dict(), make_tiny_sd(seed=0).unet.state_dict(), make_tiny_sd(seed=1).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    x, y = make_tiny_sdxl(seed=3), make_tiny_sdxl(seed=3)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(x, name).state_dict(), getattr(y, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_sdxl_micro_conditioning_dims(tiny_sdxl):
    u = tiny_sdxl.unet.config
    assert u.addition_embed_type == "text_time"
    pooled = tiny_sdxl.text_encoder_2.config.projection_dim
    assert u.projection_class_embeddings_input_dim == 6 * u.addition_time_embed_dim + pooled
    assert u.cross_attention_dim == tiny_sdxl.text_encoder.config.hidden_size + tiny_sdxl.text_encoder_2.config.hidden_size


def test_save_load_round_trip(tiny_sd, tiny_sd_dir):
    files = {p.name for p in tiny_sd_dir.rglob("*") if p.is_file()}
    assert "model_index.json" in files
    assert files & {"tokenizer.json", "vocab.json"}  # transformers 5 writes tokenizer.json only
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith(".bin") for f in files)
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.safety_checker is None
    assert loaded.scheduler.config.prediction_type == "epsilon"
    np.testing.assert_array_equal(_run(tiny_sd, seed=7), _run(loaded, seed=7))


def test_upscaled_sizes_run(tiny_sd):
    # the cascade's 4x-pixel stage size for a 32 px base; also a non-square size
    assert _run(tiny_sd, height=64, width=64).shape == (1, 64, 64, 3)
    assert _run(tiny_sd, height=32, width=48).shape == (1, 32, 48, 3)
