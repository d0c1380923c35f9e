"""The v3 UNet trainer on tiny parts: it learns, resumes exactly, refuses other settings, and exports a
folder that StableDiffusionPipeline loads and samples."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfcascade import train_sd, train_vae
from selfcascade.model_card import sd_card_text
from selfcascade.training import LoopConfig, constant_lr

TINY_UNET = {"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8, "sample_size": 4}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    train_vae.build_vae({"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(vae_dir: Path) -> train_sd.LatentData:
    from diffusers import AutoencoderKL

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    return train_sd.encode_dataset(AutoencoderKL.from_pretrained(vae_dir), images, ["red apple", "blue car"] * 3)


def _args(run_dir: Path, vae_dir: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_sd.add_arguments(parser)
    return parser.parse_args(["--vae", str(vae_dir), "--run-dir", str(run_dir), "--batch-size", "4", "--lr", "2e-3",
                              "--warmup", "1", "--unet-config", json.dumps(TINY_UNET), "--cpu", "--threads", "1",
                              "--log-every", "1", *extra])


def test_encoded_data_shapes(data: train_sd.LatentData) -> None:
    assert data.latents.shape == (6, 4, 4, 4)
    assert data.context.shape == (6, 32, 384) and data.uncond.shape == (32, 384)


def test_learns_resumes_exactly_and_exports(tmp_path: Path, vae_dir: Path, data) -> None:
    from diffusers import StableDiffusionPipeline

    straight = train_sd.train(_args(tmp_path / "a", vae_dir, "--max-steps", "40", "--checkpoint-every", "20"), data)
    losses = [v for _, v in straight["losses"]]
    assert sum(losses[-8:]) < sum(losses[:8])
    train_sd.train(_args(tmp_path / "b", vae_dir, "--max-steps", "20", "--checkpoint-every", "20"), data)
    train_sd.train(_args(tmp_path / "b", vae_dir, "--max-steps", "40", "--checkpoint-every", "20",
                         "--export", str(tmp_path / "model")), data)
    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert pipe("red apple", height=32, width=32, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert json.loads((tmp_path / "model" / "train_state.json").read_text())["train_steps"] == 40


def test_max_minutes_stops_between_checkpoints_with_one_where_it_stops(tmp_path: Path, vae_dir: Path, data,
                                                                       minute_clock) -> None:
    args = _args(tmp_path, vae_dir, "--max-steps", "40", "--checkpoint-every", "20", "--max-minutes", "3")
    assert train_sd.train(args, data)["step"] == 2  # deadline at minute 3: steps start at minutes 1 and 2
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    minute_clock.undo()
    assert train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "3"), data)["step"] == 3  # resumes from it


def test_refuses_other_settings(tmp_path: Path, vae_dir: Path, data) -> None:
    train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "1"), data)
    with pytest.raises(ValueError, match="prediction_type: run has 'epsilon', now 'v_prediction'"):
        train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "2", "--prediction-type", "v_prediction"), data)


def test_cooldown_decays_the_rate_to_zero_at_max_steps() -> None:
    config = LoopConfig(Path("."), max_steps=10, lr=1.0, warmup=2, cooldown=4)
    assert [constant_lr(config, step) for step in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]


def test_a_constant_rate_run_resumes_cooled_and_records_it(tmp_path: Path, vae_dir: Path, data) -> None:
    train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "2"), data)
    state = train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "4", "--cooldown", "2"), data)
    assert state["step"] == 4 and state["args"]["cooldown"] == 2
    summary = json.loads((train_sd.ship_run(tmp_path, tmp_path / "shipped") / "train_state.json").read_text())
    assert "(warm-up 1, linear decay to 0 over the last 2 steps)" in sd_card_text(summary, {}, parameters=1)
    with pytest.raises(ValueError, match="lr: run has 0.002, now 0.001"):  # the rate itself still may not change
        train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "5", "--cooldown", "2", "--lr", "1e-3"), data)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_changes_the_loss(prediction_type: str) -> None:
    unet = train_sd.build_sd_unet(TINY_UNET)
    scheduler = train_sd.build_sd_scheduler(prediction_type)
    latents, context = torch.randn(4, 4, 4, 4), torch.randn(4, 32, 384)
    plain = train_sd.diffusion_loss(unet, scheduler, latents, context, torch.Generator().manual_seed(1))
    weighted = train_sd.diffusion_loss(unet, scheduler, latents, context, torch.Generator().manual_seed(1), 5.0)
    assert torch.isfinite(weighted) and not torch.isclose(plain, weighted)


def test_batches_draw_zoomed_windows_with_their_cue_states() -> None:
    latents, context = torch.zeros(5, 4, 2, 2), torch.zeros(5, 3, 8)
    data = train_sd.LatentData(latents.half(), context.half(), torch.zeros(3, 8),
                               torch.ones(4, 4, 2, 2).half(), torch.ones(4, 3, 8).half())
    g = torch.Generator().manual_seed(0)
    whole, _ = train_sd.sample_batch(data, 64, 0.0, g)
    assert whole.abs().sum() == 0
    mixed, mixed_context = train_sd.sample_batch(data, 64, 0.5, g)
    zoomed = mixed.flatten(1).amax(1) == 1
    assert 10 < int(zoomed.sum()) < 54  # about half the batch
    assert torch.equal(mixed_context.flatten(1).amax(1) == 1, zoomed)  # each window keeps its own caption states


def test_caption_form_dropout_swaps_in_each_images_own_short_captions_at_their_shares() -> None:
    n = 7
    latents = torch.arange(n, dtype=torch.float16)[:, None, None, None].expand(n, 4, 2, 2)
    full = torch.arange(n, dtype=torch.float16)[:, None, None].expand(n, 3, 8)  # states tell whose caption they are
    short = {"name": full + 100, "name_style": full + 200}
    data = train_sd.LatentData(latents, full, torch.zeros(3, 8), short_context=short)
    g = torch.Generator().manual_seed(0)
    batch, context = train_sd.sample_batch(data, 4000, 0.0, g, {"name": 0.2, "name_style": 0.3})
    image, states = batch[:, 0, 0, 0], context[:, 0, 0]
    assert torch.equal(states % 100, image)  # a short caption is always the drawn image's own
    shares = [float((states // 100 == k).float().mean()) for k in range(3)]
    assert shares == pytest.approx([0.5, 0.2, 0.3], abs=0.03)
    _, unchanged = train_sd.sample_batch(data, 64, 0.0, g, {"name": 0.0, "name_style": 0.0})
    assert unchanged.amax() < 100


@pytest.mark.parametrize("shares", [("0.7", "0.4"), ("-0.1", "0")])
def test_refuses_caption_form_shares_that_are_not_a_split(tmp_path: Path, vae_dir: Path, data, shares) -> None:
    args = _args(tmp_path / "r", vae_dir, "--max-steps", "1", "--name-prob", shares[0], "--name-style-prob", shares[1])
    with pytest.raises(ValueError, match="add up to at most 1"):
        train_sd.train(args, data)


def test_refuses_a_caption_form_the_data_lacks(tmp_path: Path, vae_dir: Path, data) -> None:
    with pytest.raises(ValueError, match="short caption form.*name"):
        train_sd.train(_args(tmp_path / "r", vae_dir, "--max-steps", "1", "--name-prob", "0.2"), data)


def test_trains_on_short_captions_and_the_card_says_so(tmp_path: Path, vae_dir: Path, data) -> None:
    short = {form: train_sd.encode_captions(texts * 3)[0]
             for form, texts in {"name": ["red apple", "blue car"],
                                 "name_style": ["red apple, noto style", "blue car, noto style"]}.items()}
    with_short = train_sd.LatentData(data.latents, data.context, data.uncond, short_context=short)
    train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "2", "--name-prob", "0.2", "--name-style-prob", "0.3"),
                   with_short)
    summary = json.loads((train_sd.ship_run(tmp_path, tmp_path / "shipped") / "train_state.json").read_text())
    assert "20% of captions cut to the emoji's name alone, 30% to name and style" in sd_card_text(summary, {}, 1)
    with pytest.raises(ValueError, match="name_prob: run has 0.2, now 0.0"):
        train_sd.train(_args(tmp_path, vae_dir, "--max-steps", "3", "--name-style-prob", "0.3"), with_short)


def test_zoom_windows_are_crops_of_the_larger_renders_with_the_scale_cue(tmp_path: Path) -> None:
    from PIL import Image

    from selfcascade.data.emoji import image_path

    records = [{"id": f"e{i}", "caption": f"emoji {i}"} for i in range(3)]
    for r in records:
        path = image_path(tmp_path, 16, r["id"])
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (torch.arange(16 * 16 * 3) % 251).reshape(16, 16, 3).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path)
    chunks = list(train_sd.zoom_windows(tmp_path, records, [2], count=2, seed=0, size=8))
    windows, captions = chunks[0]
    assert windows.shape == (2, 3, 8, 8) and captions[0].endswith(", 2x zoom")
    big = torch.from_numpy(np.array(Image.open(image_path(tmp_path, 16, "e0")))).permute(2, 0, 1)
    crops = {(y, x) for y in range(9) for x in range(9) if torch.equal(big[:, y:y + 8, x:x + 8], windows[0])}
    assert crops, "a window must be an exact crop of the 2x render"


def test_ship_then_export_a_stock_folder_with_the_scale_cue(tmp_path: Path, vae_dir: Path, data, monkeypatch) -> None:
    """A run shipped into a package-style folder loads as the embedded pipeline (fp16 storage, fp32 compute), and
    `export-embedded` turns that folder into a stock SD folder that keeps the sampling defaults and banks."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from selfcascade import SelfCascadePipeline, embedded_sd

    run = tmp_path / "run"
    train_sd.train(_args(run, vae_dir, "--max-steps", "2", "--zoom-prob", "0.5"), data)
    shipped = tmp_path / "shipped"
    shutil.copytree(vae_dir, shipped / "vae")
    (shipped / "banks" / "bank-x").mkdir(parents=True)
    (shipped / "banks" / "bank-x" / "config.json").write_text("{}")
    assert not embedded_sd.is_shipped(shipped)
    train_sd.ship_run(run, shipped)
    assert embedded_sd.is_shipped(shipped)
    assert next(iter(load_file(str(shipped / "unet" / "diffusion_pytorch_model.safetensors")).values())).dtype == torch.float16
    pipe = embedded_sd.load_embedded_pipeline(shipped)
    assert pipe.unet.dtype == torch.float32
    out = train_sd.export_embedded(tmp_path / "stock", shipped)
    settings = json.loads((out / "selfcascade.json").read_text())
    assert settings["zoom_cue"] == embedded_sd.ZOOM_CUE and settings["K"] == 700
    assert (out / "banks" / "bank-x" / "config.json").is_file()
    assert json.loads((out / "train_state.json").read_text())["train_steps"] == 2
    stock = StableDiffusionPipeline.from_pretrained(out)
    assert stock("red apple", height=32, width=32, num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    cascade = SelfCascadePipeline.from_pretrained(out, device="cpu")
    assert cascade.backbone.zoom_cue == embedded_sd.ZOOM_CUE and cascade.backbone.default_k == 700
    # "embedded" is the v2 pixel-space model until v3 is shipped, then this SD model with its settings
    monkeypatch.setattr(embedded_sd, "SHIPPED_DIR", tmp_path / "not-shipped")
    assert type(SelfCascadePipeline.from_pretrained("embedded", device="cpu").backbone).__name__ == "EmbeddedBackbone"
    monkeypatch.setattr(embedded_sd, "SHIPPED_DIR", shipped)
    embedded = SelfCascadePipeline.from_pretrained("embedded", device="cpu")
    assert type(embedded.backbone).__name__ == "SDBackbone" and embedded.backbone.name == "embedded"
    assert embedded.backbone.zoom_cue == embedded_sd.ZOOM_CUE and embedded.backbone.base_size == (32, 32)
    assert type(SelfCascadePipeline.from_pretrained("embedded-v2", device="cpu").backbone).__name__ == "EmbeddedBackbone"


def test_init_from_continues_shipped_weights_and_counts_their_steps(tmp_path: Path, vae_dir: Path, data) -> None:
    first = tmp_path / "first"
    train_sd.train(_args(first, vae_dir, "--max-steps", "3"), data)
    shipped = train_sd.ship_run(first, tmp_path / "shipped")
    state = train_sd.train(_args(tmp_path / "second", vae_dir, "--max-steps", "0", "--init-from", str(shipped)), data)
    assert state["init_from"] == {"path": str(shipped), "steps": 3, "prediction_type": "epsilon", "batch_size": 4,
                                  "hardware": "CPU, 1 threads, 1 process(es)",
                                  "seconds": pytest.approx(state["init_from"]["seconds"])}
    shipped_unet = load_file(str(shipped / "unet" / "diffusion_pytorch_model.safetensors"))
    started = load_file(str(tmp_path / "second" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(started[k], shipped_unet[k].float()) for k in shipped_unet)
    # a continuation may change the objective; the card says what the earlier steps optimised
    train_sd.train(_args(tmp_path / "v", vae_dir, "--max-steps", "1", "--init-from", str(shipped),
                         "--prediction-type", "v_prediction"), data)
    again = train_sd.ship_run(tmp_path / "v", tmp_path / "again")
    summary = json.loads((again / "train_state.json").read_text())
    assert summary["init_from"]["steps"] == 3 and summary["prediction_type"] == "v_prediction"
    card = sd_card_text(summary, {}, parameters=1)
    assert "4 steps in all: the last 1 at batch 4" in card and "earlier run of 3 steps at batch 4 (" in card
    assert "on CPU" in card and "epsilon prediction)" in card
    with pytest.raises(ValueError, match="another UNet layout"):
        train_sd.train(_args(tmp_path / "third", vae_dir, "--max-steps", "0", "--init-from", str(shipped),
                             "--unet-config", json.dumps({**TINY_UNET, "block_out_channels": [16, 16, 16, 32]})), data)


def test_v3_model_card_records_the_run_and_the_shipped_banks(tmp_path: Path, vae_dir: Path, data) -> None:
    import shutil

    from selfcascade import embedded_sd
    from selfcascade.model_card import MEASURED_MD, SAMPLES_PNG, SAMPLES_TRAIN_PNG, write_model_card
    from selfcascade.train_upsamplers import save_bank
    from selfcascade.upsamplers import UpsamplerBank

    run = tmp_path / "run"
    train_sd.train(_args(run, vae_dir, "--max-steps", "2"), data)
    shipped = tmp_path / "shipped"
    shutil.copytree(vae_dir, shipped / "vae")
    train_sd.ship_run(run, shipped)
    bank = UpsamplerBank.for_unet(embedded_sd.build_sd_unet(TINY_UNET), scale=4.0, train_size=[64, 64],
                                  tuned_from="banks/bank-32")
    save_bank(bank, shipped / "banks" / "bank-64", step=7, seconds=30.0)
    assert "## Measured" not in write_model_card(shipped, captions=["red apple"], steps=1).read_text()
    (shipped / MEASURED_MD).write_text("| concept top-5 | 25% |\n")
    text = write_model_card(shipped, captions=["red apple, fruit, noto style"], steps=1).read_text()
    assert "## Measured\n\n| concept top-5 | 25% |" in text
    params = sum(p.numel() for p in bank.parameters())
    assert f"`banks/bank-64`: 32 -> 64 px, 7 steps (0.5 min), tuned on from `bank-32`, {params:,} parameters, K 700" in text
    assert "2 steps at batch 4" in text
    assert (shipped / SAMPLES_PNG).is_file() and (shipped / SAMPLES_TRAIN_PNG).is_file()
