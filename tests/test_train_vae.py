"""The VAE trainer on a tiny AutoencoderKL: SD's layout, it learns, resumes exactly, refuses other settings,
and exports a diffusers folder whose scaling factor comes from the data; a decoder-only fine-tune leaves the
encoder bit-identical and keeps its source's scaling factor."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfcascade import train_vae
from selfcascade.training import check_resume, prior_training

TINY = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}


def _source() -> train_vae.CropSource:
    g = torch.Generator().manual_seed(0)
    # Flat-coloured squares on white, like the emoji renders: easy to learn in a few steps.
    images = torch.full((6, 3, 32, 32), 255, dtype=torch.uint8)
    for i in range(6):
        colour = torch.randint(0, 255, (3, 1, 1), generator=g, dtype=torch.uint8)
        images[i, :, 8:24, 8:24] = colour
    return train_vae.CropSource([images], crop=16)


def _args(run_dir: Path, *extra: str, new_vae: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_vae.add_arguments(parser)
    layout = ["--vae-config", json.dumps(TINY)] if new_vae else []
    return parser.parse_args(["--run-dir", str(run_dir), "--batch-size", "4", "--crop", "16", "--warmup", "1",
                              "--lr", "2e-3", *layout, "--cpu", "--threads", "1", *extra])


def test_default_vae_has_sd_layout() -> None:
    vae = train_vae.build_vae()
    x = torch.zeros(1, 3, 64, 64)
    z = vae.encode(x).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)  # 8x downsampling to 4 channels, as SD's VAE
    assert vae.decode(z).sample.shape == x.shape


def test_training_reduces_loss_and_resumes_exactly(tmp_path: Path) -> None:
    source = _source()
    straight = train_vae.train(_args(tmp_path / "a", "--max-steps", "30", "--checkpoint-every", "10",
                                     "--log-every", "1"), source)
    losses = [v for _, v in straight["losses"]]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    train_vae.train(_args(tmp_path / "b", "--max-steps", "20", "--checkpoint-every", "10"), source)
    resumed = train_vae.train(_args(tmp_path / "b", "--max-steps", "30", "--checkpoint-every", "10"), source)
    assert resumed["step"] == 30
    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_refuses_to_resume_under_other_settings(tmp_path: Path) -> None:
    source = _source()
    train_vae.train(_args(tmp_path, "--max-steps", "2"), source)
    with pytest.raises(ValueError, match=r"crop: run has 16, now 8"):
        train_vae.train(_args(tmp_path, "--max-steps", "4", "--crop", "8"), train_vae.CropSource(source.stacks, 8))


def test_check_resume_names_every_difference(tmp_path: Path) -> None:
    saved = {"lr": 1e-3, "batch_size": 8, "seed": 0}
    check_resume(saved, {"lr": 1e-3, "batch_size": 8, "new_key": 1}, tmp_path)  # unknown to the run: accepted
    check_resume(None, {"lr": 2e-3}, tmp_path)  # a run that recorded no settings: nothing to compare
    with pytest.raises(ValueError, match=r"lr: run has 0.001, now 0.002.*batch_size: run has 8, now 4.*--run-dir!"):
        check_resume(saved, {"lr": 2e-3, "batch_size": 4, "seed": 0}, tmp_path, hint="!")


def test_export_is_a_diffusers_folder_with_standardised_latents(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    source = _source()
    train_vae.train(_args(tmp_path / "run", "--max-steps", "3", "--export", str(tmp_path / "vae")), source)
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    images = torch.cat([source.batch(4, torch.Generator().manual_seed(0)) for _ in range(8)])
    mean, std = train_vae.latent_statistics(vae, images)  # other crops than the export's: near, not exact
    assert vae.config.scaling_factor == 1.0
    assert mean.abs().max() < 0.3 and (std - 1).abs().max() < 0.3
    assert json.loads((tmp_path / "vae" / "train_state.json").read_text())["train_steps"] == 3
    summary = json.loads((tmp_path / "vae" / "train_state.json").read_text())
    assert prior_training(tmp_path / "vae") == {"path": str(tmp_path / "vae"), "steps": 3, "seconds": 0,
                                                "batch_size": summary["batch_size"], "hardware": summary["hardware"]}


def test_crop_larger_than_images_is_refused() -> None:
    with pytest.raises(ValueError, match="lower --crop"):
        train_vae.CropSource([torch.zeros(1, 3, 8, 8, dtype=torch.uint8)], crop=16)


SOURCE_SCALE = 0.777  # not what the data would give: a recomputed factor would not match it


def _source_vae(folder: Path) -> Path:
    """A tiny exported VAE to fine-tune (random weights: the decoder has everything to learn)."""
    torch.manual_seed(1)
    vae = train_vae.build_vae(TINY)
    vae.register_to_config(scaling_factor=SOURCE_SCALE)
    vae.save_pretrained(folder)
    return folder


def _part(weights: dict[str, torch.Tensor], *prefixes: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k.startswith(prefixes)}


def test_decoder_only_keeps_encoder_and_scaling_factor(tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    before = AutoencoderKL.from_pretrained(_source_vae(tmp_path / "src")).state_dict()
    state = train_vae.train(_args(tmp_path / "run", "--max-steps", "30", "--log-every", "1", "--init-from",
                                  str(tmp_path / "src"), "--decoder-only", "--export", str(tmp_path / "out"),
                                  new_vae=False), _source())
    losses = [v for _, v in state["losses"]]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    exported = AutoencoderKL.from_pretrained(tmp_path / "out")
    trained = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    frozen = ("encoder.", "quant_conv.")
    for after in (exported.state_dict(), trained):
        assert _part(after, *frozen).keys() == _part(before, *frozen).keys()
        assert all(torch.equal(v, before[k]) for k, v in _part(after, *frozen).items())
        assert not all(torch.equal(v, before[k]) for k, v in _part(after, "decoder.", "post_quant_conv.").items())
    assert exported.config.scaling_factor == SOURCE_SCALE
    summary = json.loads((tmp_path / "out" / "train_state.json").read_text())
    assert summary["decoder_only"] and summary["init_from"]["path"] == str(tmp_path / "src")


def test_frozen_encoder_stays_in_eval_mode_without_gradients() -> None:
    vae = train_vae.build_vae(TINY)
    train_vae.freeze_encoder(vae)
    vae.train()  # what the training loop does
    assert not vae.encoder.training and not vae.quant_conv.training and vae.decoder.training
    assert not any(p.requires_grad for p in [*vae.encoder.parameters(), *vae.quant_conv.parameters()])
    assert all(p.requires_grad for p in [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()])


def test_decoder_only_refusals(tmp_path: Path) -> None:
    source, src = _source(), str(_source_vae(tmp_path / "src"))
    with pytest.raises(ValueError, match="--decoder-only .* --init-from"):
        train_vae.train(_args(tmp_path / "a", "--decoder-only"), source)
    with pytest.raises(ValueError, match="--vae-config sets up a new VAE"):
        train_vae.train(_args(tmp_path / "a", "--init-from", src), source)
    with pytest.raises(FileNotFoundError, match="holds no VAE"):
        train_vae.train(_args(tmp_path / "a", "--init-from", str(tmp_path), new_vae=False), source)
    train_vae.train(_args(tmp_path / "b", "--max-steps", "2", "--init-from", src, "--decoder-only", new_vae=False),
                    source)
    with pytest.raises(ValueError, match="decoder_only: run has True, now False"):  # would move the encoder
        train_vae.train(_args(tmp_path / "b", "--max-steps", "4", "--init-from", src, new_vae=False), source)


def test_standardized_latents_have_zero_mean_unit_std_and_decode_the_same() -> None:
    """Folding per-channel latent statistics into quant_conv/post_quant_conv changes the latents, not the images."""
    torch.manual_seed(0)
    vae = train_vae.build_vae(TINY).eval()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(images).latent_dist.mode()
        before = vae.decode(raw).sample
        mean, std = raw.mean((0, 2, 3)), raw.std((0, 2, 3))
        train_vae.standardize_latents(vae, mean, std)
        latents = vae.encode(images).latent_dist.mode()
        after = vae.decode(latents).sample  # scaling_factor is now 1: pipelines decode latents as they are
    assert vae.config.scaling_factor == 1.0
    torch.testing.assert_close(latents.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(latents.std((0, 2, 3)), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
