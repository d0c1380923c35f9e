"""The v3 video sibling on tiny parts: the inflated UNet3D is the image UNet frame by frame, training on latent
clips learns and resumes exactly, and the export is a stock TextToVideoSDPipeline folder the cascade runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from selfcascade import embedded_sd, train_sd_video, train_vae
from selfcascade.train_sd import diffusion_loss, encode_images
from selfcascade.unet_inflation import changed_head_splits, inflate_unet, video_config

#: SD 1.5's block layout at tiny widths; heads per block chosen so every attention level's heads are 4 wide.
TINY_SD = {"block_out_channels": [16, 32, 32, 32], "attention_head_dim": [4, 8, 8, 8], "norm_num_groups": 8,
           "sample_size": 4}
#: What the trainer's tests inflate: 8 heads of width 2 at every level (head width 2 keeps the split).
TINY_UNET = {"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8, "sample_size": 4}
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}


@pytest.mark.parametrize("linear_projection", [False, True])
def test_inflated_unet_is_the_image_unet_frame_by_frame(linear_projection: bool) -> None:
    torch.manual_seed(0)
    unet2d = embedded_sd.build_sd_unet({**TINY_SD, "use_linear_projection": linear_projection}).eval()
    for p in unet2d.parameters():  # non-trivial weights everywhere (diffusers zero-inits some outputs)
        p.data.normal_(0, 0.05)
    unet3d = inflate_unet(unet2d).eval()
    assert [type(b).__name__ for b in unet3d.down_blocks] == ["CrossAttnDownBlock3D"] * 3 + ["DownBlock3D"]
    assert unet3d.config.attention_head_dim == 4
    clips, t, context = torch.randn(2, 4, 3, 8, 8), torch.tensor([10, 700]), torch.randn(2, 32, 384)
    with torch.no_grad():
        video = unet3d(clips, t, context).sample
        frames = unet2d(clips.transpose(1, 2).flatten(0, 1), t.repeat_interleave(3),
                        encoder_hidden_states=context.repeat_interleave(3, 0)).sample
        # the temporal layers do act once trained: perturbing one changes the output
        unet3d.down_blocks[0].temp_attentions[0].proj_out.weight.normal_(0, 0.5)
        moved = unet3d(clips, t, context).sample
    torch.testing.assert_close(video, frames.unflatten(0, (2, 3)).transpose(1, 2), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(moved, video, atol=1e-3)


def test_sd15_heads_need_one_head_width() -> None:
    """8 heads at widths 16 and 32 are 2 and 4 wide: a stock UNet3D has one width, chosen by head_dim."""
    sd15 = {**embedded_sd.SD15_UNET, "block_out_channels": [16, 32, 32, 32], "norm_num_groups": 8}
    with pytest.raises(ValueError, match="one head width; this UNet's heads are 2/4 channels wide"):
        video_config(sd15)
    assert video_config(sd15, head_dim=4)["attention_head_dim"] == 4
    assert changed_head_splits(sd15, 4) == ["16: 8 -> 4 heads"]
    with pytest.raises(ValueError, match="head width 3 must divide"):
        video_config(sd15, head_dim=3)
    with pytest.raises(ValueError, match="cannot express this UNet's class_embed_type"):
        video_config({**sd15, "class_embed_type": "timestep"}, head_dim=4)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    """A tiny v3 image model folder with its own sampling defaults."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("v3") / "image"
    return embedded_sd.save_sd_folder(folder, embedded_sd.build_sd_unet(TINY_UNET), train_vae.build_vae(TINY_VAE),
                                      sampling={"K": 600, "guidance_scale": 5.0})


@pytest.fixture(scope="module")
def data(image_model: Path):
    from diffusers import AutoencoderKL

    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 255, (4, 3, 2, 32, 32), generator=g, dtype=torch.uint8)
    vae = AutoencoderKL.from_pretrained(image_model / "vae")
    return train_sd_video.encode_clips(vae, clips, ["red apple, moving right", "blue car, spinning"] * 2)


def _args(run_dir: Path, image_model: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_sd_video.add_arguments(parser)
    return parser.parse_args(["--init-from", str(image_model), "--run-dir", str(run_dir), "--frames", "2",
                              "--head-dim", "2", "--batch-size", "4", "--lr", "2e-3", "--warmup", "1", "--cpu",
                              "--threads", "1", "--log-every", "1", *extra])


def test_encoded_clips_are_latents_per_frame(image_model: Path, data) -> None:
    from diffusers import AutoencoderKL

    assert data.latents.shape == (4, 4, 2, 4, 4) and data.context.shape == (4, 32, 384)
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 255, (4, 3, 2, 32, 32), generator=g, dtype=torch.uint8)
    second_frames = encode_images(AutoencoderKL.from_pretrained(image_model / "vae"), clips[:, :, 1])
    torch.testing.assert_close(data.latents[:, :, 1], second_frames)


def test_learns_resumes_exactly_and_refuses_other_settings(tmp_path: Path, image_model: Path, data) -> None:
    from diffusers import UNet2DConditionModel, UNet3DConditionModel

    straight = train_sd_video.train(_args(tmp_path / "a", image_model, "--max-steps", "30", "--checkpoint-every", "15"),
                                    data)
    assert straight["step"] == 30
    train_sd_video.train(_args(tmp_path / "b", image_model, "--max-steps", "15", "--checkpoint-every", "15"), data)
    train_sd_video.train(_args(tmp_path / "b", image_model, "--max-steps", "30", "--checkpoint-every", "15"), data)
    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # the loss on one fixed batch of clips, before (the inflated image UNet) and after training
    start = inflate_unet(UNet2DConditionModel.from_pretrained(image_model / "unet"), 2).eval()
    trained = UNet3DConditionModel(**straight["unet_config"]).eval()
    trained.load_state_dict(a)
    scheduler = embedded_sd.build_sd_scheduler()
    with torch.no_grad():
        before, after = (diffusion_loss(unet, scheduler, data.latents.float(), data.context.float(),
                                        torch.Generator().manual_seed(7)) for unet in (start, trained))
    assert after < 0.8 * before

    with pytest.raises(ValueError, match="frames: run has 2, now 4"):
        train_sd_video.train(_args(tmp_path / "a", image_model, "--max-steps", "31", "--frames", "4"), data)


def test_export_is_a_stock_video_folder_the_cascade_runs(tmp_path: Path, image_model: Path, data) -> None:
    import diffusers

    from selfcascade import SelfCascadePipeline

    out = tmp_path / "video"
    train_sd_video.train(_args(tmp_path / "run", image_model, "--max-steps", "2", "--export", str(out)), data)
    assert json.loads((out / "selfcascade.json").read_text()) == {"K": 600, "guidance_scale": 5.0, "num_frames": 2}
    summary = json.loads((out / "train_state.json").read_text())
    assert summary["frames"] == 2 and summary["init_from"]["path"] == str(image_model)
    for loader in ("TextToVideoSDPipeline", "DiffusionPipeline"):
        pipe = getattr(diffusers, loader).from_pretrained(out)
        assert type(pipe).__name__ == "TextToVideoSDPipeline" and type(pipe.text_encoder).__name__ == "BertModel"
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        frames = pipe("red apple, moving right", height=32, width=32, num_frames=2, num_inference_steps=2,
                      output_type="np").frames
        assert frames.shape == (1, 2, 32, 32, 3)
    cascade = SelfCascadePipeline.from_pretrained(out, device="cpu")
    assert type(cascade.backbone).__name__ == "VideoBackbone" and cascade.backbone.default_k == 600
    assert cascade.backbone.default_num_frames == 2  # the clip length it was trained on, not diffusers' 16
    video = cascade("red apple, moving right", 64, 64, num_inference_steps=2, seed=0,
                    mode="tuning-free", output_type="pt").frames
    assert video.shape == (1, 2, 3, 64, 64) and torch.isfinite(video).all()


def test_ship_puts_the_sibling_beside_the_image_model_as_embedded_video(tmp_path: Path, image_model: Path, data,
                                                                        monkeypatch) -> None:
    import shutil

    from selfcascade import SelfCascadePipeline

    package = tmp_path / "embedded_v3"  # the package layout: the image model's parts, no model_index.json
    monkeypatch.setattr(embedded_sd, "SHIPPED_VIDEO_DIR", package / "video")
    with pytest.raises(FileNotFoundError, match="ships inside the image model's folder"):
        train_sd_video.train(_args(tmp_path / "run", image_model, "--max-steps", "2", "--ship"), data)
    shutil.copytree(image_model / "vae", package / "vae")
    train_sd_video.ship_run(tmp_path / "run")
    video_dir = package / "video"
    assert json.loads((video_dir / "selfcascade.json").read_text()) == {"K": 600, "guidance_scale": 5.0, "num_frames": 2}
    summary = json.loads((video_dir / "train_state.json").read_text())
    assert summary["train_steps"] == 2 and summary["prediction_type"] == "epsilon"  # the image model's objective
    assert json.loads((video_dir / "unet" / "config.json").read_text())["_class_name"] == "UNet3DConditionModel"
    cascade = SelfCascadePipeline.from_pretrained("embedded-video", device="cpu")
    assert cascade.backbone.name == "embedded-video" and type(cascade.backbone).__name__ == "VideoBackbone"
    assert cascade.backbone.default_k == 600
    from selfcascade.train_sd import export_embedded

    from selfcascade.model_card import SAMPLES_GIF, write_model_card

    card = write_model_card(video_dir, captions=["red apple, fruit, noto style"], steps=1).read_text()
    assert "# selfcascade embedded video model" in card and "2 steps at batch 4 clips" in card
    assert "2 frames (`selfcascade.json`)" in card and (video_dir / SAMPLES_GIF).is_file()
    exported = export_embedded(tmp_path / "stock", video_dir)
    assert json.loads((exported / "model_index.json").read_text())["_class_name"] == "TextToVideoSDPipeline"
    video = cascade("red apple, moving right", 64, 64, num_frames=2, num_inference_steps=2, seed=0,
                    mode="tuning-free", output_type="pt").frames
    assert video.shape == (1, 2, 3, 64, 64) and torch.isfinite(video).all()


def test_init_from_must_be_an_image_model_folder(tmp_path: Path, image_model: Path, data) -> None:
    with pytest.raises(FileNotFoundError, match="lacks unet, vae, scheduler/"):
        train_sd_video.train(_args(tmp_path / "run", tmp_path, "--max-steps", "1"), data)


def test_clip_folder_is_encoded_once_at_the_base_size(tmp_path: Path, image_model: Path, monkeypatch) -> None:
    """``--data``: clips of PNG frames with captions, resized to 128 px, encoded and cached beside the run."""
    from PIL import Image

    clips = tmp_path / "clips"
    for name, colour in (("apple", (200, 20, 20)), ("car", (20, 20, 200))):
        (clips / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), colour).save(clips / name / f"frame-{i:04d}.png")
        (clips / f"{name}.txt").write_text(f"{name}, moving right\n")
    args = _args(tmp_path / "run", image_model, "--max-steps", "1", "--batch-size", "1", "--data", str(clips))
    train_sd_video.train(args)
    cache = tmp_path / "run" / "clip_latents.safetensors"
    latents = load_file(str(cache))["latents"]
    assert latents.shape == (2, 4, 2, 16, 16)  # 2 clips, 2 of their 3 frames, 128 px through the 8x VAE
    monkeypatch.setattr(train_sd_video, "encode_clips", None)  # the second run must read the cache
    train_sd_video.train(_args(tmp_path / "run", image_model, "--max-steps", "2", "--batch-size", "1",
                               "--data", str(clips)))


def test_max_minutes_stops_with_a_checkpoint_where_it_stops(tmp_path: Path, image_model: Path, data,
                                                            minute_clock) -> None:
    args = _args(tmp_path, image_model, "--max-steps", "40", "--checkpoint-every", "20", "--max-minutes", "3")
    assert train_sd_video.train(args, data)["step"] == 2  # deadline at minute 3: steps start at minutes 1 and 2
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    minute_clock.undo()
    assert train_sd_video.train(_args(tmp_path, image_model, "--max-steps", "3"), data)["step"] == 3
