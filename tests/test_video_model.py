"""The embedded video model: the image UNet inflated to 3D, trained on clips, exported, and sampled."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from selfcascade import SelfCascadePipeline, train_base
from selfcascade.backbones.embedded import zoom_label
from selfcascade.train_base import SCALE_CONDITIONING, build_unet, inflate_unet, video_config

TINY = {
    "sample_size": 8,
    "block_out_channels": [32, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}


class TinyClips:
    """Four 2-frame 8x8 clips with random 4-token contexts: the interface the trainer uses."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.clips = torch.rand(4, 3, 2, 8, 8, generator=g) * 2 - 1
        self.hidden = torch.randn(4, 4, 384, generator=g)

    def __len__(self) -> int:
        return 4

    def batch(self, idx: torch.Tensor):
        return self.clips[idx], self.hidden[idx], torch.ones(len(idx), 4, dtype=torch.bool)

    def uncond(self):
        return torch.zeros(4, 384), torch.ones(4, dtype=torch.bool)


def _args(run_dir: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_base.add_arguments(parser)
    return parser.parse_args(["--run-dir", str(run_dir), "--batch-size", "2", "--lr", "1e-3", "--warmup", "1",
                              "--unet-config", json.dumps(TINY), "--cpu", "--threads", "1", *extra])


@pytest.mark.parametrize("scale_conditioned", [False, True])
def test_inflated_unet_computes_the_image_unet_frame_by_frame(scale_conditioned: bool) -> None:
    torch.manual_seed(0)
    unet2d = build_unet({**TINY, **(SCALE_CONDITIONING if scale_conditioned else {})}).eval()
    for p in unet2d.parameters():  # non-trivial weights everywhere (diffusers zero-inits some outputs)
        p.data.normal_(0, 0.05)
    unet3d = inflate_unet(unet2d).eval()
    assert type(unet3d).__name__ == "UNet3DConditionModel"
    clips, t, context = torch.randn(2, 3, 3, 8, 8), torch.tensor([10, 700]), torch.randn(2, 4, 384)
    # A scale-conditioned image UNet is inflated at zoom 1 (frames are base-size content).
    labels = {"class_labels": torch.full((6,), zoom_label(1.0))} if scale_conditioned else {}
    with torch.no_grad():
        video = unet3d(clips, t, context).sample
        frames = unet2d(clips.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3), context.repeat_interleave(3, 0),
                        **labels).sample
    torch.testing.assert_close(video, frames.unflatten(0, (2, 3)).transpose(1, 2), atol=1e-5, rtol=1e-4)


def test_video_config_keeps_the_head_split() -> None:
    assert video_config({**train_base.DEFAULT_UNET, "layers_per_block": 1})["attention_head_dim"] == 4  # 128 / 32 heads
    with pytest.raises(ValueError, match="must divide their channels"):
        video_config({**train_base.DEFAULT_UNET, "attention_head_dim": 48})


def test_video_training_exports_a_model_the_pipeline_samples_clips_with(tmp_path: Path) -> None:
    from tests.test_train_base import TinyData

    from selfcascade.pipeline import SelfCascadePipeline

    train_base.train(_args(tmp_path / "image", "--max-steps", "1", "--export", str(tmp_path / "image-model")), TinyData())
    state = train_base.train(_args(tmp_path / "video", "--max-steps", "3", "--checkpoint-every", "3", "--frames", "2",
                                   "--init-from", str(tmp_path / "image-model"), "--export", str(tmp_path / "video-model")),
                             TinyClips())
    assert state["step"] == 3 and state["num_frames"] == 2
    card = json.loads((tmp_path / "video-model" / "selfcascade_model.json").read_text())
    assert card["num_frames"] == 2 and card["video_train_steps"] == 3 and card["train_steps"] == 4
    with pytest.raises(ValueError, match="same --frames"):
        train_base.train(_args(tmp_path / "video", "--max-steps", "4", "--frames", "4"), TinyClips())

    from PIL import Image

    from selfcascade.model_card import SAMPLES_GIF, write_model_card

    text = write_model_card(tmp_path / "video-model", captions=["red apple, fruit, noto style"], steps=1).read_text()
    assert "video model" in text and "3 steps on clips" in text and "red apple, fruit, noto style, moving right" in text
    with Image.open(tmp_path / "video-model" / SAMPLES_GIF) as gif:
        assert gif.n_frames == 2  # one grid per frame of the clips

    cascade = SelfCascadePipeline.from_pretrained(tmp_path / "video-model", device="cpu")
    assert cascade.backbone.is_video and cascade.backbone.default_num_frames == 2
    out = cascade("a red apple, moving left", 16, 16, num_inference_steps=2, seed=0, output_type="pt")
    assert out.frames.shape == (1, 2, 3, 16, 16)  # [B, F, C, H, W]: frames from the card, stage plan 8 -> 16 px
    assert torch.isfinite(out.frames).all()


def test_generate_video_defaults_to_the_shipped_video_model(tmp_path: Path, capsys) -> None:
    from selfcascade.cli import main

    assert main(["generate-video", "red apple, fruit, noto style, moving right", "--size", "256", "--dry-run",
                 "--device", "cpu", "-o", str(tmp_path / "apple.gif")]) == 0
    out = capsys.readouterr().out
    settings = json.loads(out.split("\nscale plan")[0])
    assert settings["model"] == "embedded-video" and settings["frames"] == 8  # the clip length it was trained on
    assert "base 128x128 -> target 256x256" in out  # v3's sibling: 128 px clips, one cascade stage above
    assert not (tmp_path / "apple.gif").exists()


def test_v2s_video_model_keeps_a_name_of_its_own() -> None:
    """`embedded-video` moves to v3's sibling once it ships; v2's stays loadable (its results are reproduced so)."""
    cascade = SelfCascadePipeline.from_pretrained("embedded-video-v2", device="cpu")
    assert type(cascade.backbone).__name__ == "EmbeddedBackbone" and cascade.backbone.is_video
    assert cascade.backbone.base_size == (32, 32) and cascade.backbone.name == "embedded-video-v2"
