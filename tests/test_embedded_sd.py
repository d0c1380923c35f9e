"""The v3 embedded model's stock SD folder: diffusers' own loaders read it offline with no extra arguments,
prompts encode exactly as training encodes them, and the cascade runs on it through the SD backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfcascade import embedded_sd, train_vae

TINY_UNET = {"block_out_channels": [16, 16, 16, 16], "norm_num_groups": 8}
TINY_VAE = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("emb") / "tiny-sd"
    return embedded_sd.save_sd_folder(out, embedded_sd.build_sd_unet(TINY_UNET), train_vae.build_vae(TINY_VAE))


def test_unet_has_sd15_topology_and_module_names() -> None:
    unet = embedded_sd.build_sd_unet(TINY_UNET)
    names = {n for n, _ in unet.named_modules()}
    # The names SD tools (HiDiffusion, LoRA files) key on.
    assert "down_blocks.0.attentions.1.transformer_blocks.0.attn2" in names
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1" in names
    assert "mid_block.attentions.0" in names
    assert [type(b).__name__ for b in unet.down_blocks] == list(embedded_sd.SD15_UNET["down_block_types"])


@pytest.mark.parametrize("loader", ["StableDiffusionPipeline", "DiffusionPipeline"])
def test_stock_loaders_read_the_folder(folder: Path, loader: str) -> None:
    import diffusers

    pipe = getattr(diffusers, loader).from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.text_encoder).__name__ == "BertModel"
    assert pipe.tokenizer.model_max_length == 32
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae_scale_factor == 8


def test_pipeline_encodes_prompts_as_training_does(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    prompts = ["red apple, fruit, noto style", "grinning face"]
    stock, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    tokenizer, encoder = embedded_sd.load_text_components()
    ours = embedded_sd.encode_prompts(tokenizer, encoder, prompts)
    assert stock.shape == (2, 32, 384)
    torch.testing.assert_close(stock, ours)
    # The mask matters: without it padding positions would differ (so the test can tell).
    unmasked = encoder(tokenizer(prompts, padding="max_length", max_length=32, return_tensors="pt").input_ids)[0]
    assert not torch.allclose(unmasked, ours)


def test_stock_pipeline_and_cascade_run_on_the_folder(folder: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from selfcascade import SelfCascadePipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    image = pipe("red apple", height=128, width=128, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (128, 128, 3)
    cascade = SelfCascadePipeline.from_pipe(pipe)
    out = cascade("red apple", height=256, width=256, num_inference_steps=2, seed=0, output_type="np")
    assert out.images[0].shape == (256, 256, 3)

