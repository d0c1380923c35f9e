"""Text-to-video backbone (``TextToVideoSDPipeline``, ``UNet3DConditionModel``): the same sampler on [B, C, F, H, W].

A tiny random-weight video pipeline (``selfcascade.testing.make_tiny_video``: native 16x16 px, sides a
multiple of 4), 3 frames, 2-3 steps, targets of 32 px (4x pixels).
"""

from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from PIL import Image

from selfcascade import SelfCascadePipeline
from selfcascade.backbones import VideoBackbone
from selfcascade.cli import main
from selfcascade.unet_features import level_sizes, pivot_features
from selfcascade.upsamplers import UpsamplerBank
from selfcascade.testing import VIDEO_BASE_PX, make_tiny_video

PROMPT = "a red apple"
FRAMES = 3
FAST = dict(num_frames=FRAMES, num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def tiny_video_pipe():
    """Shared tiny TextToVideoSDPipeline (seed 0). Read-only."""
    return make_tiny_video(seed=0)


@pytest.fixture(scope="module")
def video(tiny_video_pipe):
    return SelfCascadePipeline.from_pipe(tiny_video_pipe)


@pytest.fixture(scope="module")
def video_32(video):
    """The reference run: tuning-free 16 -> 32 px, 3 frames, seed 0, every stage returned as latents."""
    return video(PROMPT, 32, 32, seed=0, output_type="latent", return_stages=True, **FAST)


@pytest.fixture(scope="module")
def video_dir(tiny_video_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_video") / "pipe"
    tiny_video_pipe.save_pretrained(path, safe_serialization=True)
    return path


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# ----------------------------------------------------------------------------------- backbone
def test_from_pipe_detects_the_video_pipeline_and_leaves_it_unchanged(tiny_video_pipe, video):
    bb = video.backbone
    assert isinstance(bb, VideoBackbone) and bb.is_video
    assert bb.base_size == (VIDEO_BASE_PX, VIDEO_BASE_PX) and bb.size_multiple == 4
    assert bb.default_guidance_scale == 9.0 and bb.default_num_frames == 16
    assert type(bb.scheduler).__name__ == "DDIMScheduler" and bb.scheduler is not tiny_video_pipe.scheduler
    assert bb.latent_shape(2, 32, 48, 5) == (2, 4, 5, 16, 24)


# ------------------------------------------------------------------------------ stages, shapes
def test_frames_stay_fixed_while_each_stage_grows(video, video_32):
    assert video_32.plan.stages == ((16, 16), (32, 32))
    assert [tuple(s.shape) for s in video_32.stages] == [(1, 4, FRAMES, 8, 8), (1, 4, FRAMES, 16, 16)]
    assert video_32.settings["num_frames"] == FRAMES and video_32.settings["guidance_scale"] == [9.0, 9.0]
    out = video(PROMPT, 32, 32, seed=0, output_type="np", return_stages=True, **FAST)
    assert out.images.shape == (1, FRAMES, 32, 32, 3)  # diffusers' video layout [B, F, H, W, 3]
    assert [s.shape for s in out.stages] == [(1, FRAMES, 16, 16, 3), (1, FRAMES, 32, 32, 3)]
    assert np.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
    assert out.images.std() > 0.01
    decoded = video.backbone.decode(video_32.images).detach().permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_allclose(decoded, out.images, atol=1e-6)  # same sample, decoded frame by frame
    pil = video(PROMPT, 32, 32, seed=0, output_type="pil", **FAST)
    assert len(pil.frames) == 1 and len(pil.frames[0]) == FRAMES and pil.frames[0][0].size == (32, 32)
    np.testing.assert_array_equal(np.asarray(pil.frames[0][1]), np.round(out.images[0, 1] * 255).astype(np.uint8))
    assert tuple(video(PROMPT, 32, 32, seed=0, output_type="pt", **FAST).frames.shape) == (1, FRAMES, 3, 32, 32)


def test_later_stage_runs_only_the_tail_below_k(video):
    seen: dict[int, list[int]] = {}

    def callback(stage, i, t, latents):
        assert latents.shape[2] == FRAMES
        seen.setdefault(stage, []).append(int(t))

    video(PROMPT, 32, 32, seed=0, output_type="latent", K=400, callback=callback,
          **{**FAST, "num_inference_steps": 3})
    assert seen == {0: [667, 334, 1], 1: [334, 1]}


def test_direct_mode_reproduces_the_diffusers_video_pipeline(tiny_video_pipe, video):
    out = video(PROMPT, 16, 16, mode="direct", seed=3, output_type="np", **FAST)
    reference = tiny_video_pipe(PROMPT, height=16, width=16, num_frames=FRAMES, num_inference_steps=2,
                                guidance_scale=9.0, output_type="np", generator=torch.Generator().manual_seed(3)).frames
    np.testing.assert_allclose(out.images, reference, atol=1e-5)


def test_same_seed_same_clip_and_each_clip_has_its_own_seed(video, video_32):
    again = video(PROMPT, 32, 32, seed=0, output_type="latent", **FAST).images
    assert torch.equal(again, video_32.images)
    pair = video(PROMPT, 32, 32, seed=[1, 0], num_images_per_prompt=2, output_type="latent", **FAST).images
    assert torch.allclose(pair[1:], video_32.images, atol=1e-4)  # batched kernels differ in the last bits
    assert not torch.allclose(pair[:1], pair[1:], atol=1e-2)


def test_pixel_space_pivot_and_hires_fix_run_per_frame(video):
    out = video(PROMPT, 32, 32, mode="hires-fix", seed=0, output_type="latent", **FAST)
    assert out.settings["pivot_space"] == "pixel" and out.images.shape == (1, 4, FRAMES, 16, 16)
    frames = torch.rand(1, 3, FRAMES, 16, 16)
    assert video.backbone.encode(frames).shape == (1, 4, FRAMES, 8, 8)


# ------------------------------------------------------------------------------------- tuned
@pytest.mark.parametrize("injection", ["skip", "hidden"])
def test_zero_bank_reproduces_tuning_free_and_trained_bank_changes_it(video, video_32, injection):
    unet = video.backbone.unet
    bank = UpsamplerBank.for_unet(unet, injection=injection)
    tuned = video(PROMPT, 32, 32, mode="tuned", upsamplers=bank, seed=0, output_type="latent", return_stages=True,
                  **FAST)
    assert torch.equal(tuned.images, video_32.images)
    torch.manual_seed(0)
    for up in bank.upsamplers:
        torch.nn.init.normal_(up.proj_out.weight, std=0.5)
    changed = video(PROMPT, 32, 32, mode="tuned", upsamplers=bank, seed=0, output_type="latent", return_stages=True,
                    **FAST)
    assert torch.equal(changed.stages[0], video_32.stages[0])  # the base stage is never touched
    assert not torch.allclose(changed.images, video_32.images, atol=1e-3)
    assert _hook_count(unet) == 0


def test_pivot_features_are_per_frame(video):
    bb = video.backbone
    embeds = bb.encode_prompt([PROMPT], None, 1, do_cfg=True)
    latents = torch.randn(1, 4, FRAMES, 8, 8)
    features = pivot_features(bb.unet, latents, bb.unet_inputs(embeds, 16, 16, do_cfg=True), do_cfg=True)
    assert [f.shape[0] for f in features] == [2 * FRAMES] * 2  # CFG x frames, folded as the UNet folds them
    assert [tuple(f.shape[-2:]) for f in features] == level_sizes(bb.unet, 8, 8)
    assert [f.shape[1] for f in features] == list(UpsamplerBank.for_unet(bb.unet).config.level_channels)


# ------------------------------------------------------------------------------------ decode
def test_chunked_decode_equals_full_decode_and_diffusers(tiny_video_pipe):
    bb = VideoBackbone(tiny_video_pipe, decode_chunk_size=2)
    latents = torch.randn(2, 4, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        chunked = bb.decode(latents)
        bb.decode_chunk_size = 16
        full = bb.decode(latents)
        reference = (tiny_video_pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
    assert chunked.shape == (2, 3, 5, 16, 16)
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="decode_chunk_size must be a positive number of frames, got 0"):
        bb.decode_chunk_size = 0


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,message", [
    (dict(num_frames=0), r"num_frames must be a positive integer, got 0"),
    (dict(num_frames=2.5), r"num_frames must be a positive integer, got 2.5"),
    (dict(mode="attn-sf"), r"mode 'attn-sf' is not supported for video models; use one of tuning-free"),
    (dict(mode="redilate"), r"mode 'redilate' is not supported for video models"),
])
def test_bad_video_arguments_get_clear_errors(video, kwargs, message):
    with pytest.raises(ValueError, match=message):
        video(PROMPT, 32, 32, **{**FAST, **kwargs})


def test_image_models_refuse_num_frames(tiny_sd):
    with pytest.raises(ValueError, match=r"num_frames applies only to text-to-video models"):
        SelfCascadePipeline.from_pipe(tiny_sd)(PROMPT, 64, 64, num_frames=4, progress=False)


# --------------------------------------------------------------------------------------- CLI
def test_cli_video_modes_match_the_pipeline():
    from selfcascade import cli, pipeline

    assert cli.VIDEO_MODES is pipeline.VIDEO_MODES  # one list, in selfcascade.modes


def _cli(video_dir, output, *extra: str) -> int:
    return main(["generate-video", PROMPT, "--model", str(video_dir), "--frames", str(FRAMES), "--size", "32",
                 "--steps", "2", "--device", "cpu", "--no-progress", "-o", str(output), *extra])


def test_cli_writes_gif_and_png_frames(video_dir, tmp_path, capsys):
    gif = tmp_path / "clip.gif"
    assert _cli(video_dir, gif, "--seeds", "0", "--decode-chunk", "2") == 0
    assert capsys.readouterr().out.split() == [str(gif)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]  # no temp files left
    with Image.open(gif) as image:
        assert image.n_frames == FRAMES and image.size == (32, 32)
        settings = json.loads(image.info["comment"])
    assert settings["num_frames"] == FRAMES and settings["stages"] == [[16, 16], [32, 32]] and settings["seed"] == 0

    folder = tmp_path / "frames"
    assert _cli(video_dir, folder, "--seeds", "0-1") == 0
    for seed in (0, 1):
        names = sorted(p.name for p in (tmp_path / f"frames-{seed}").iterdir())
        assert names == [f"frame-{i:04d}.png" for i in range(FRAMES)]
        with Image.open(tmp_path / f"frames-{seed}" / "frame-0002.png") as image:
            assert image.size == (32, 32) and f"Seed: {seed}" in image.text["parameters"]


def test_cli_writes_mp4(video_dir, tmp_path):
    imageio = pytest.importorskip("imageio.v2", reason="MP4 output needs the optional imageio + imageio-ffmpeg")
    pytest.importorskip("imageio_ffmpeg", reason="MP4 output needs the optional imageio + imageio-ffmpeg")
    mp4 = tmp_path / "clip.mp4"
    assert _cli(video_dir, mp4, "--fps", "4") == 0
    with imageio.get_reader(mp4, format="FFMPEG") as reader:
        assert reader.get_meta_data()["fps"] == 4
        frames = [frame for frame in reader]  # list() asks len(), infinite for a stream
    assert len(frames) == FRAMES and frames[0].shape == (32, 32, 3)


def test_cli_mp4_without_imageio_names_the_install(video_dir, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_imageio(name, *args, **kwargs):
        if name.startswith("imageio"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_imageio)
    assert _cli(video_dir, tmp_path / "clip.mp4") == 2
    err = capsys.readouterr().err
    assert "pip install imageio imageio-ffmpeg" in err and ".gif" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["--frames", "0"], "expected a positive integer, got '0'"),
    (["--decode-chunk", "x"], "expected a positive integer, got 'x'"),
    (["--mode", "attn-sf"], "invalid choice: 'attn-sf'"),
])
def test_cli_rejects_bad_options_before_loading(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate-video", PROMPT, "--model", str(tmp_path / "never-loaded"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_clear_errors(video_dir, tiny_sd_dir, tmp_path, capsys):
    assert _cli(video_dir, tmp_path / "clip.avi") == 2
    assert "end it in .gif or .mp4, or give a folder" in capsys.readouterr().err
    assert main(["generate-video", PROMPT, "--model", str(tiny_sd_dir), "--device", "cpu",
                 "-o", str(tmp_path / "x.gif")]) == 2
    assert "makes images, not clips" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_cli_dry_run_prints_frames_and_plan(video_dir, capsys):
    assert _cli(video_dir, "unused.gif", "--dry-run", "--frames", "5") == 0
    out = capsys.readouterr().out
    settings = json.loads(out[: out.index("scale plan")])
    assert settings["frames"] == 5 and settings["guidance"] == [9.0, 9.0] and settings["outputs"] == ["unused.gif"]
    assert "16x16 -> target 32x32" in out


# ------------------------------------------------------------------------ tuning on clips
def _moving_square(frames: int, seed: int, size: tuple[int, int] = (40, 36)) -> list[Image.Image]:
    """A coloured square sliding over a fixed noise background (not square, so the loader crops)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    colour = rng.integers(0, 255, 3, dtype=np.uint8)
    clip = []
    for f in range(frames):
        frame = background.copy()
        frame[10:22, 4 + 3 * f:16 + 3 * f] = colour
        clip.append(Image.fromarray(frame))
    return clip


@pytest.fixture
def clip_folder(tmp_path):
    """Two GIFs (4 and 5 frames), one folder of PNG frames (4), and a 2-frame GIF that --frames 3 skips."""
    from selfcascade.io import save_video

    folder = tmp_path / "clips"
    for name, frames, target in (("a", 4, "a.gif"), ("b", 5, "b.gif"), ("c", 4, "c"), ("short", 2, "short.gif")):
        save_video(_moving_square(frames, seed=len(name) + frames), folder / target)
        (folder / f"{name}.txt").write_text(f"{PROMPT} {name}")
    return folder


def test_clip_folder_loads_the_first_frames_and_skips_short_clips(clip_folder, caplog):
    from selfcascade.train_upsamplers import load_data

    data = load_data(clip_folder, 16, frames=FRAMES)
    assert tuple(data.images.shape) == (3, 3, FRAMES, 16, 16) and data.num_frames == FRAMES
    assert data.captions == [f"{PROMPT} a", f"{PROMPT} b", f"{PROMPT} c"]
    assert "1 of 4 clips" in caplog.text and "fewer than --frames 3" in caplog.text
    with Image.open(clip_folder / "b.gif") as gif:  # frames 0..2 of b, centre-cropped 40x36 -> 36x36, resized
        for f in range(FRAMES):
            gif.seek(f)
            frame = gif.convert("RGB").crop((2, 0, 38, 36)).resize((16, 16), Image.BICUBIC, reducing_gap=None)
            np.testing.assert_array_equal(data.images[1, :, f].permute(1, 2, 0).numpy(), np.asarray(frame))
    with pytest.raises(ValueError, match="every clip .* has fewer than --frames 6 frames; lower --frames"):
        load_data(clip_folder, 16, frames=6)


def test_pivot_cache_keeps_each_clips_frame_rows_together(video):
    from selfcascade.train_upsamplers import ImageCaptions, PivotCache

    bb = video.backbone
    clips = torch.randint(0, 256, (2, 3, FRAMES, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageCaptions(clips, [PROMPT, "the pear"])
    z, embeds, features = PivotCache(bb, data, low_size=16).batch([1, 0], [False, True])
    assert tuple(z.shape) == (2, 4, FRAMES, 16, 16) and embeds.batch_size == 2
    assert [tuple(f.shape) for f in features] == [(2 * FRAMES, 16, 8, 8), (2 * FRAMES, 32, 4, 4)]
    alone = PivotCache(bb, data, low_size=16).batch([1], [False])[2]
    for both, one in zip(features, alone):  # clip 1's rows come first, all FRAMES of them
        torch.testing.assert_close(both[:FRAMES], one, atol=1e-5, rtol=0)


def test_tuning_on_clips_lowers_loss_with_the_base_frozen():
    from selfcascade.train_upsamplers import ImageCaptions, PivotCache, tuning_loss

    from test_upsamplers import _checksum

    bb = SelfCascadePipeline.from_pipe(make_tiny_video(seed=0)).backbone
    bb.freeze()  # as train-upsamplers does
    before = _checksum(bb.unet)
    clips = torch.randint(0, 256, (2, 3, FRAMES, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z0, embeds, features = PivotCache(bb, ImageCaptions(clips, [PROMPT, ""]), low_size=16).batch([0, 1], [False, True])
    bank = UpsamplerBank.for_unet(bb.unet)
    optimizer = torch.optim.Adam(bank.parameters(), lr=3e-2)
    t, noise = torch.tensor([100, 500]), torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = tuning_loss(bb, bank, z0, embeds, features, t, noise)  # 5-D latents, B*F feature rows
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert _checksum(bb.unet) == before and all(p.grad is None for p in bb.unet.parameters())
    assert _hook_count(bb.unet) == 0


def _folder_checksum(folder) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _train(model, data, run, *extra: str) -> int:
    return main(["train-upsamplers", "--model", str(model), "--data", str(data), "--size", "32", "--batch-size", "2",
                 "--run-dir", str(run), "--threads", "1", "--log-every", "1", *extra])


def test_cli_tunes_a_bank_on_clips_resumes_and_samples_tuned(video, video_dir, clip_folder, tmp_path):
    run, before = tmp_path / "run", _folder_checksum(video_dir)
    common = ["--frames", str(FRAMES)]
    assert _train(video_dir, clip_folder, run, *common, "--max-steps", "2", "--validate-every", "2",
                  "--validation-steps", "2") == 0
    with Image.open(run / "validation" / "step-000002.png") as grid:  # 2 rows (modes) x 3 clips' middle frames
        assert grid.height > 2 * 32 and grid.width > 3 * 32
    assert _train(video_dir, clip_folder, run, *common, "--max-steps", "3", "--validate-every", "0") == 0  # resumes
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and [s for s, _ in state["losses"]] == [1, 2, 3] and state["args"]["frames"] == FRAMES
    config = json.loads((run / "bank" / "config.json").read_text())
    assert config["train_size"] == [32, 32] and config["train_steps"] == 3 and config["base_model"] == str(video_dir)
    assert _folder_checksum(video_dir) == before  # the base model is never written

    free = video(PROMPT, 32, 32, seed=0, output_type="latent", **FAST).images
    tuned = video(PROMPT, 32, 32, mode="tuned", upsamplers=str(run / "bank"), seed=0, output_type="latent", **FAST)
    assert tuned.images.shape == free.shape == (1, 4, FRAMES, 16, 16)
    assert not torch.equal(tuned.images, free)  # three steps moved the zero-initialised output layers


def test_cli_clear_errors_when_model_and_data_kinds_differ(video_dir, tiny_sd_dir, clip_folder, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "one.png")
    (images / "one.txt").write_text(PROMPT)
    assert _train(video_dir, images, tmp_path / "r1", "--max-steps", "1") == 2
    assert "holds images, not clips: a text-to-video model tunes on a folder of .gif/.mp4" in capsys.readouterr().err
    manifest = tmp_path / "dataset"
    manifest.mkdir()
    (manifest / "manifest.jsonl").write_text("")
    assert _train(video_dir, manifest, tmp_path / "r2", "--max-steps", "1") == 2
    assert "is an image data set: a text-to-video model tunes on" in capsys.readouterr().err
    assert main(["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(clip_folder), "--size", "64",
                 "--run-dir", str(tmp_path / "r3"), "--threads", "1"]) == 2
    assert "holds video clips (4, e.g. a.gif) and no images" in capsys.readouterr().err
    assert main(["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(images), "--frames", "3",
                 "--run-dir", str(tmp_path / "r4"), "--threads", "1"]) == 2
    assert "--frames applies only to text-to-video models" in capsys.readouterr().err
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3", "r4"))
