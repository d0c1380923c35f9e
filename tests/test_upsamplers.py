"""The tuned self-cascade: feature upsampler bank, UNet hooks, tuning, save/load, CLI (tiny models only)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from selfcascade import SelfCascadePipeline
from selfcascade.cli import main
from selfcascade.train_base import DEFAULT_UNET
from selfcascade.train_upsamplers import ImageCaptions, PivotCache, tuning_loss
from selfcascade.unet_features import capture, inject, level_sizes, pivot_features
from selfcascade.unet_layout import unet_layout
from selfcascade.upsamplers import UpsamplerBank

CALL = dict(height=64, width=64, num_inference_steps=3, seed=0, output_type="latent", progress=False)

# Published UNet configs (weights not needed: the models are built on the meta device).
SD21_UNET = dict(
    sample_size=64, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
)
SDXL_UNET = dict(
    sample_size=128, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[320, 640, 1280],
    layers_per_block=2, attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def _hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _randomise(bank: UpsamplerBank, seed: int = 0) -> UpsamplerBank:
    torch.manual_seed(seed)
    for up in bank.upsamplers:
        torch.nn.init.normal_(up.proj_out.weight, std=0.5)
    return bank


def _checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def sd_cascade(tiny_sd):
    return SelfCascadePipeline.from_pipe(tiny_sd)


@pytest.fixture(scope="module")
def sdxl_cascade(tiny_sdxl):
    return SelfCascadePipeline.from_pipe(tiny_sdxl)


@pytest.mark.parametrize("family,injection", [("sd", "skip"), ("sd", "hidden"), ("sdxl", "skip"), ("sdxl", "hidden")])
def test_zero_bank_reproduces_tuning_free_and_trained_bank_changes_it(family, injection, request):
    cascade = request.getfixturevalue(f"{family}_cascade")
    unet = cascade.backbone.unet
    reference = cascade("red apple", **CALL).images
    bank = UpsamplerBank.for_unet(unet, injection=injection)
    assert torch.equal(cascade("red apple", mode="tuned", upsamplers=bank, **CALL).images, reference)
    changed = cascade("red apple", mode="tuned", upsamplers=_randomise(bank), **CALL).images
    assert not torch.equal(changed, reference)
    assert _hook_count(unet) == 0


def test_stage_zero_is_untouched_and_per_stage_banks(sd_cascade):
    unet = sd_cascade.backbone.unet
    bank = _randomise(UpsamplerBank.for_unet(unet))
    call = {**CALL, "height": 96, "width": 96, "num_inference_steps": 2, "return_stages": True}
    free = sd_cascade("red apple", **call)
    tuned = sd_cascade("red apple", mode="tuned", upsamplers=[None, bank], **call)
    assert torch.equal(free.stages[0], tuned.stages[0]) and torch.equal(free.stages[1], tuned.stages[1])
    assert not torch.equal(free.stages[2], tuned.stages[2])


def test_capture_gives_one_feature_per_level_and_removes_hooks(sd_cascade):
    bb = sd_cascade.backbone
    embeds = bb.encode_prompt(["red apple"], None, 1, do_cfg=True)
    inputs = bb.unet_inputs(embeds, 32, 32, do_cfg=True)
    features = pivot_features(bb.unet, torch.randn(1, 4, 16, 16), inputs, do_cfg=True)
    layout = unet_layout(bb.unet)
    assert [f.shape[1] for f in features] == list(layout.level_channels)
    assert [tuple(f.shape[-2:]) for f in features] == level_sizes(bb.unet, 16, 16)
    assert all(f.shape[0] == 2 for f in features)  # CFG layout
    with pytest.raises(RuntimeError), capture(bb.unet):
        raise RuntimeError("hooks must go even on errors")
    bank = UpsamplerBank.for_unet(bb.unet, injection="hidden")
    with pytest.raises(RuntimeError), inject(bb.unet, bank, features):
        raise RuntimeError
    assert _hook_count(bb.unet) == 0


def test_pivot_batch_layout_mismatch_is_explained(sd_cascade):
    bb = sd_cascade.backbone
    embeds = bb.encode_prompt(["red apple"], None, 1, do_cfg=False)
    features = pivot_features(bb.unet, torch.randn(1, 4, 16, 16), bb.unet_inputs(embeds, 32, 32, False), do_cfg=False)
    bank = UpsamplerBank.for_unet(bb.unet)
    inputs = bb.unet_inputs(bb.encode_prompt(["a"], None, 1, do_cfg=True), 64, 64, do_cfg=True)
    with pytest.raises(ValueError, match="classifier-free-guidance layout"), inject(bb.unet, bank, features):
        bb.unet(torch.randn(2, 4, 32, 32), 10, **inputs)
    assert _hook_count(bb.unet) == 0


def test_mismatched_bank_names_both(sd_cascade):
    bank = UpsamplerBank(level_channels=[32, 64, 128], time_embed_dim=128, base_model="some/other-model")
    with pytest.raises(ValueError, match=r"some/other-model.*\[32, 64, 128\].*\[32, 64\]"):
        sd_cascade("red apple", mode="tuned", upsamplers=bank, **CALL)


def test_tuned_mode_needs_a_bank_and_banks_need_tuned_mode(sd_cascade):
    bank = UpsamplerBank.for_unet(sd_cascade.backbone.unet)
    with pytest.raises(ValueError, match="needs upsamplers"):
        sd_cascade("red apple", mode="tuned", **CALL)
    with pytest.raises(ValueError, match="only apply to mode='tuned'"):
        sd_cascade("red apple", upsamplers=bank, **CALL)
    with pytest.raises(ValueError, match="one .* per stage"):
        sd_cascade("red apple", mode="tuned", upsamplers=[bank, bank], **CALL)


def test_save_load_round_trip(sd_cascade, tmp_path):
    bank = _randomise(UpsamplerBank.for_unet(sd_cascade.backbone.unet, base_model="tiny-sd", scale=4.0, K=650))
    bank.save_pretrained(tmp_path / "bank")
    assert {p.name for p in (tmp_path / "bank").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    loaded = UpsamplerBank.from_pretrained(tmp_path / "bank")
    assert loaded.config.base_model == "tiny-sd" and loaded.config.K == 650
    assert list(loaded.config.level_channels) == [32, 64]
    expected = sd_cascade("red apple", mode="tuned", upsamplers=bank, **CALL).images
    assert torch.equal(sd_cascade("red apple", mode="tuned", upsamplers=str(tmp_path / "bank"), **CALL).images, expected)


@pytest.mark.parametrize("make", ["tiny_sd_fresh", "tiny_sd_v"])
def test_tuning_lowers_loss_on_a_fixed_batch_with_the_base_frozen(make, request):
    torch.manual_seed(0)
    cascade = SelfCascadePipeline.from_pipe(request.getfixturevalue(make))
    bb = cascade.backbone
    bb.freeze()  # as train-upsamplers does
    before = _checksum(bb.unet)
    data = ImageCaptions(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), ["red apple", "the pear"])
    z0, embeds, features = PivotCache(bb, data, low_size=16).batch([0, 1], [False, True])
    bank = UpsamplerBank.for_unet(bb.unet)
    optimizer = torch.optim.Adam(bank.parameters(), lr=1e-2)
    t = torch.tensor([100, 500])
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(25):
        loss = tuning_loss(bb, bank, z0, embeds, features, t, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert _checksum(bb.unet) == before
    assert all(p.grad is None for p in bb.unet.parameters())
    assert _hook_count(bb.unet) == 0


@pytest.mark.parametrize("name,config,expected", [
    ("sd21", SD21_UNET, 38_324), ("sdxl", SDXL_UNET, 26_424), ("embedded", DEFAULT_UNET, 5_204),
])
def test_bank_is_under_a_thousandth_of_the_unet(name, config, expected):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    bank = UpsamplerBank.for_unet(unet)
    assert bank.num_parameters() == expected
    assert bank.num_parameters() < 1e-3 * unet.num_parameters()


def test_cli_train_resume_extend_and_generate(tiny_sd_dir, caption_folder, tmp_path):
    run = tmp_path / "run"
    common = ["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(caption_folder), "--size", "64",
              "--batch-size", "2", "--run-dir", str(run), "--threads", "1", "--log-every", "1"]
    assert main([*common, "--max-steps", "2", "--validate-every", "2", "--validation-steps", "2"]) == 0
    assert (run / "validation" / "step-000002.png").is_file()
    assert main([*common, "--max-steps", "3", "--validate-every", "0", "--snapshot-every", "3"]) == 0  # resumes
    snapshot = UpsamplerBank.from_pretrained(run / "snapshots" / "step-000003")
    assert snapshot.num_parameters() == 2140 and snapshot.config.train_steps == 3 and snapshot.config.train_seconds > 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and [s for s, _ in state["losses"]] == [1, 2, 3]
    config = json.loads((run / "bank" / "config.json").read_text())
    assert config["scale"] == 4.0 and config["train_size"] == [64, 64] and config["base_model"] == str(tiny_sd_dir)
    assert config["train_steps"] == 3

    extended = tmp_path / "extended"
    assert main(["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(caption_folder), "--scale", "16",
                 "--size", "128", "--batch-size", "1", "--max-steps", "1", "--run-dir", str(extended),
                 "--init-from", str(run / "bank"), "--validate-every", "0", "--threads", "1"]) == 0
    config = json.loads((extended / "bank" / "config.json").read_text())
    assert config["scale"] == 16.0 and config["tuned_from"] == str(run / "bank")

    out = tmp_path / "tuned.png"
    assert main(["generate", "red apple", "--model", str(tiny_sd_dir), "--size", "64", "--steps", "2",
                 "--mode", "tuned", "--upsamplers", str(run / "bank"), "--no-progress", "-o", str(out)]) == 0
    assert json.loads(Image.open(out).info["selfcascade"])["upsamplers"] == [str(run / "bank")]


def test_max_minutes_stops_with_a_checkpoint_and_the_bank(tiny_sd_dir, caption_folder, tmp_path, minute_clock):
    run = tmp_path / "run"
    assert main(["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(caption_folder), "--size", "64",
                 "--batch-size", "1", "--run-dir", str(run), "--threads", "1", "--validate-every", "5",
                 "--validation-steps", "2", "--max-steps", "50", "--max-minutes", "2"]) == 0
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 1
    assert json.loads((run / "bank" / "config.json").read_text())["train_steps"] == 1
    assert (run / "validation" / "step-000001.png").is_file()  # the grid of where it stopped


@pytest.mark.slow
def test_two_process_cpu_run(tiny_sd_dir, caption_folder, tmp_path):
    """Data-parallel tuning on 2 CPU processes (gloo). accelerate's own multi-CPU launcher needs MPI, so
    torchrun starts the processes; Accelerator picks the setup up from its environment."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "selfcascade.train_upsamplers", "--cpu", "--model", str(tiny_sd_dir), "--data", str(caption_folder),
           "--size", "64", "--batch-size", "1", "--max-steps", "2", "--run-dir", str(run), "--validate-every", "0",
           "--threads", "1"]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert UpsamplerBank.from_pretrained(run / "bank").num_parameters() == 2140


def test_embedded_tuned_mode_defaults_to_the_banks_shipped_beside_the_model(tmp_path):
    from diffusers import DDPMScheduler

    from selfcascade.backbones.base import BANKS_DIR
    from selfcascade.backbones.embedded import EmbeddedBackbone

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4)
    bb = EmbeddedBackbone(unet, DDPMScheduler(), text_encoder=None)
    bb.use_model_folder(tmp_path)
    assert bb.default_banks([(16, 16)]) is None
    for side in (16, 32):
        bank = UpsamplerBank.for_unet(unet)
        bank.register_to_config(train_size=[side, side])
        bank.save_pretrained(tmp_path / BANKS_DIR / f"bank-{side}")
    chosen = bb.default_banks([(16, 16), (32, 32), (64, 64)])
    assert [Path(c).name for c in chosen] == ["bank-16", "bank-32", "bank-32"]
    cascade = SelfCascadePipeline(bb)
    banks = cascade._stage_banks(None, cascade.plan(32, 32))  # base 8 px: stages 16 and 32
    assert [b.config.train_size for b in banks] == [[16, 16], [32, 32]]


# ------------------------------------------------------------------------------ training memory and resuming
def test_gradient_checkpointing_and_sliced_encoding_give_the_same_gradients(tiny_sd_fresh):
    """Checkpointing recomputes the frozen UNet's activations in backward; the bank's gradients must not change,
    nor may encoding pivots a few images at a time change the cache."""
    bb = SelfCascadePipeline.from_pipe(tiny_sd_fresh).backbone
    bb.freeze()
    data = ImageCaptions(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), ["red apple", "the pear", "a cat"])
    z0, embeds, features = PivotCache(bb, data, low_size=16, encode_batch=3).batch([0, 1, 2], [False] * 3)
    z1, _, features1 = PivotCache(bb, data, low_size=16, encode_batch=1).batch([0, 1, 2], [False] * 3)
    torch.testing.assert_close(z1, z0)
    torch.testing.assert_close(features1, features)
    bank = _randomise(UpsamplerBank.for_unet(bb.unet))
    t, noise = torch.tensor([100, 500, 900]), torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))

    def grads() -> list[torch.Tensor]:
        bank.zero_grad()
        tuning_loss(bb, bank, z0, embeds, features, t, noise).backward()
        return [p.grad.clone() for p in bank.parameters()]

    plain = grads()
    bb.unet.enable_gradient_checkpointing()
    torch.testing.assert_close(grads(), plain)
    assert all(p.grad is None for p in bb.unet.parameters())


def test_resuming_under_other_settings_names_each_difference(tiny_sd_dir, caption_folder, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["train-upsamplers", "--model", str(tiny_sd_dir), "--data", str(caption_folder), "--batch-size", "1",
              "--run-dir", str(run), "--threads", "1", "--validate-every", "0", "--max-steps", "2"]
    assert main([*common, "--size", "64", "--grad-accum", "2", "--gradient-checkpointing", "--encode-batch", "1"]) == 0
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["signature"]["scale"] == 4.0 and state["signature"]["size"] == [32, 64]
    assert main([*common, "--scale", "16", "--size", "128", "--max-steps", "3"]) == 2
    error = capsys.readouterr().err
    assert "scale: run has 4.0, now 16.0" in error and "size: run has [32, 64], now [32, 128]" in error
    assert "--run-dir" in error
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2  # nothing was trained


def test_bank_training_reads_captions_as_the_cascade_stage_does(tiny_sd_fresh):
    """A model with a scale cue: the high-res pass is trained on the cued caption (as stage r reads it), a dropped
    caption stays empty (guidance's unconditional branch has no cue)."""
    bb = SelfCascadePipeline.from_pipe(tiny_sd_fresh).backbone
    bb.zoom_cue, bb.zoom_factors = "{prompt}, {zoom}x zoom", (2, 4)
    data = ImageCaptions(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), ["red apple", "the pear"])
    _, embeds, _ = PivotCache(bb, data, low_size=32).batch([0, 1], [False, True])
    expected = bb.encode_prompt(["red apple, 2x zoom", ""], None, 1, do_cfg=False).embeds
    assert torch.allclose(embeds.embeds, expected)
    assert not torch.allclose(embeds.embeds, bb.encode_prompt(["red apple", ""], None, 1, do_cfg=False).embeds)


def test_image_folder_is_read_per_batch_squared_and_resized(tmp_path):
    """Training images are read when a batch needs them (a big set at 1024 px does not fit in memory), each
    centre-cropped to a square and resized as before."""
    from selfcascade.train_upsamplers import ImageFiles, load_image_folder

    wide = torch.zeros(24, 48, 3, dtype=torch.uint8)
    wide[:, 12:36] = 255  # the centre square is white, the sides black
    Image.fromarray(wide.numpy()).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("white square")
    data = load_image_folder(tmp_path, 16)
    assert isinstance(data.images, ImageFiles) and data.images.shape == (2, 3, 16, 16) and data.num_frames is None
    batch = data.images[torch.tensor([1, 0])]
    assert batch.dtype == torch.uint8 and batch.shape == (2, 3, 16, 16)
    assert (batch[1] == 255).all() and (batch[0] == torch.tensor([10, 20, 30]).view(3, 1, 1)).all()
    assert data.images[0].shape == (3, 16, 16) and data.captions == ["white square", ""]
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "b.png")  # read again, not held
    assert (data.images[[1]][0, 0] == 200).all()
