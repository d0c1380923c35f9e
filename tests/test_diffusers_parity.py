"""``SelfCascadePipeline`` behaves like a diffusers pipeline: generator=, precomputed prompt embeddings, clip_skip,
cross_attention_kwargs, callback_on_step_end, latent output, batching by chunks, any size the pipeline takes, the
execution device under accelerate's offload hooks, and save/load with its banks."""

from __future__ import annotations

import logging

import pytest
import torch

from selfcascade import SelfCascadePipeline, UpsamplerBank
from selfcascade.pipeline import default_batch_size

PROMPT = "a red apple"
FAST = dict(num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return SelfCascadePipeline.from_pipe(tiny_sd)


def _pt(cascade, prompt=PROMPT, height=64, width=64, **kwargs):
    return cascade(prompt, height, width, output_type="pt", **FAST, **kwargs).images


def _unet_calls(unet):
    """(batch sizes, keyword arguments) of every UNet call until the handle is removed."""
    calls: list[tuple[int, dict]] = []
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(((args[0] if args else kwargs["sample"]).shape[0], kwargs)),
        with_kwargs=True)
    return calls, handle


# ------------------------------------------------------------------------------ generator=
def test_generator_is_reproducible_and_drives_every_stage(sd):
    a = _pt(sd, generator=torch.Generator().manual_seed(5))
    b = _pt(sd, generator=torch.Generator().manual_seed(5))
    c = _pt(sd, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    out = sd(PROMPT, 64, 64, generator=torch.Generator().manual_seed(5), output_type="pt", **FAST)
    assert out.seeds == [None]  # the caller's generator drew the noise: no seed to record


def test_one_generator_per_image_makes_each_image_as_if_alone(sd):
    pair = _pt(sd, [PROMPT, "a blue car"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    second = _pt(sd, "a blue car", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(pair[1:], second, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------ prompt_embeds, clip_skip
def test_prompt_embeds_give_the_images_of_their_prompt(sd, tiny_sd):
    embeds, negative = tiny_sd.encode_prompt(PROMPT, torch.device("cpu"), 1, True, negative_prompt="blurry")
    from_text = _pt(sd, seed=0, negative_prompt="blurry")
    from_embeds = sd(None, 64, 64, prompt_embeds=embeds, negative_prompt_embeds=negative, seed=0, output_type="pt",
                     **FAST).images
    torch.testing.assert_close(from_embeds, from_text)


def test_sdxl_takes_pooled_embeds(tiny_sdxl):
    cascade = SelfCascadePipeline.from_pipe(tiny_sdxl)
    embeds, negative, pooled, negative_pooled = tiny_sdxl.encode_prompt(
        PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
    from_embeds = cascade(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                          negative_pooled_prompt_embeds=negative_pooled, height=64, width=64, seed=0,
                          output_type="pt", **FAST).images
    torch.testing.assert_close(from_embeds, _pt(cascade, seed=0))
    with pytest.raises(ValueError, match="needs prompt_embeds and pooled_prompt_embeds together"):
        cascade(prompt_embeds=embeds, height=64, width=64, **FAST)


def test_clip_skip_reaches_the_text_encoder(tiny_sdxl):
    """On SDXL: diffusers 0.42's SD 1.x encode_prompt reads ``text_encoder.text_model`` for clip_skip, which
    transformers 5's CLIPTextModel no longer has (an upstream incompatibility, not the cascade's)."""
    cascade = SelfCascadePipeline.from_pipe(tiny_sdxl)
    skipped = cascade(PROMPT, 64, 64, clip_skip=1, seed=0, output_type="pt", **FAST)
    embeds, negative, pooled, negative_pooled = tiny_sdxl.encode_prompt(
        PROMPT, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True, clip_skip=1)
    same = _pt(cascade, None, prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
               negative_pooled_prompt_embeds=negative_pooled, seed=0)
    torch.testing.assert_close(skipped.images, same)
    assert (skipped.images - _pt(cascade, seed=0)).abs().max() > 1e-4
    assert skipped.settings["clip_skip"] == 1


# ------------------------------------------------------------------------------ cross_attention_kwargs
def test_cross_attention_kwargs_reach_every_unet_call(sd, tiny_sd):
    calls, handle = _unet_calls(tiny_sd.unet)
    try:
        _pt(sd, seed=0, cross_attention_kwargs={"scale": 1.0})
    finally:
        handle.remove()
    assert len(calls) == 4  # 2 steps x 2 stages
    assert all(kwargs["cross_attention_kwargs"] == {"scale": 1.0} for _, kwargs in calls)


# ------------------------------------------------------------------------------ callback_on_step_end
def test_callback_on_step_end_sees_every_step_and_can_replace_latents(sd):
    seen = []

    def record(pipe, i, t, tensors):
        seen.append((pipe.current_stage, i, int(t), tuple(tensors["latents"].shape)))
        if pipe.current_stage == 1 and i == 1:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    out = sd(PROMPT, 64, 64, seed=0, output_type="latent", callback_on_step_end=record, **FAST)
    assert [(r, i) for r, i, _, _ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [shape for *_, shape in seen] == [(1, 4, 16, 16)] * 2 + [(1, 4, 32, 32)] * 2
    assert torch.count_nonzero(out.images) == 0  # the replaced latents are the output


def test_latent_output_is_the_final_stage_latents(sd):
    out = sd(PROMPT, 64, 96, seed=0, output_type="latent", return_stages=True, **FAST)
    assert out.images.shape == (1, 4, 32, 48)
    assert [tuple(s.shape) for s in out.stages] == [(1, 4, h // 2, w // 2) for h, w in out.plan.stages]


# ------------------------------------------------------------------------------ batch_size
def test_seeds_run_in_chunks_with_the_same_images(sd, tiny_sd):
    calls, handle = _unet_calls(tiny_sd.unet)
    try:
        chunked = _pt(sd, seed=[3, 4, 5], num_images_per_prompt=3, batch_size=2)
    finally:
        handle.remove()
    assert [b for b, _ in calls] == [4, 4, 4, 4, 2, 2, 2, 2]  # CFG doubles each chunk of 2, then of 1
    whole = _pt(sd, seed=[3, 4, 5], num_images_per_prompt=3, batch_size=3)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-4)


def test_default_batch_size_shrinks_with_the_target():
    assert default_batch_size(2048, 2048) == 1
    assert default_batch_size(1024, 1024) == 4
    assert default_batch_size(3072, 3072) == 1
    assert default_batch_size(512, 512, num_frames=16) == 1


# ------------------------------------------------------------------------------ sizes
def test_final_stage_takes_any_size_the_pipeline_takes():
    """200x360 on SD 1.5 (VAE 8, UNet multiple 64) scaled to the tiny SD-1.5 layout (VAE 2, multiple 16)."""
    from selfcascade.testing import make_tiny_sd15

    cascade = SelfCascadePipeline.from_pipe(make_tiny_sd15())
    out = cascade(PROMPT, 50, 90, seed=0, output_type="pt", **FAST)
    assert out.images.shape == (1, 3, 50, 90)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in out.plan.stages[:-1])
    with pytest.raises(ValueError, match="height=51 is not a multiple of 2"):
        cascade(PROMPT, 51, 90, **FAST)


# ------------------------------------------------------------------------------ execution device
def test_offloaded_components_sample_as_before(tiny_sd_fresh):
    """accelerate's offload hooks (what enable_sequential_cpu_offload installs) keep the weights off the device."""
    from accelerate import cpu_offload

    reference = _pt(SelfCascadePipeline.from_pipe(tiny_sd_fresh), seed=0)
    for name in ("unet", "vae", "text_encoder"):
        cpu_offload(getattr(tiny_sd_fresh, name), execution_device=torch.device("cpu"))
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    assert next(tiny_sd_fresh.unet.parameters()).device.type == "meta"
    assert cascade.backbone.device == torch.device("cpu")
    torch.testing.assert_close(_pt(cascade, seed=0), reference)


def test_model_cpu_offload_samples_as_before(tiny_sd_fresh):
    reference = _pt(SelfCascadePipeline.from_pipe(tiny_sd_fresh), seed=0)
    tiny_sd_fresh.enable_model_cpu_offload(device="cpu")
    torch.testing.assert_close(_pt(SelfCascadePipeline.from_pipe(tiny_sd_fresh), seed=0), reference)


def test_device_is_the_hooks_execution_device_not_the_weights(tiny_sd_fresh):
    """Under offload the weights sit on the CPU (or meta) while every forward runs on the accelerator: latents,
    embeddings and generators must be made there."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(tiny_sd_fresh.unet, AlignDevicesHook(execution_device=torch.device("cuda", 0)))
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    assert next(tiny_sd_fresh.unet.parameters()).device.type == "cpu"
    assert cascade.backbone.device == torch.device("cuda", 0)


# ------------------------------------------------------------------------------ save / load
def test_save_pretrained_round_trips_settings_and_banks(tiny_sd_fresh, tmp_path):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    cascade.backbone.sampling_k = 600
    bank = UpsamplerBank.for_unet(tiny_sd_fresh.unet, scale=4.0, K=600, train_size=[64, 64])
    torch.manual_seed(0)
    for p in bank.parameters():
        p.data.normal_(0, 0.1)  # a trained-looking bank, so tuned differs from tuning-free
    tuned = _pt(cascade, seed=0, mode="tuned", upsamplers=bank)

    folder = cascade.save_pretrained(tmp_path / "cascade", upsamplers=bank)
    assert (folder / "model_index.json").is_file() and (folder / "banks" / "64px-4x" / "config.json").is_file()
    loaded = SelfCascadePipeline.from_pretrained(folder, device="cpu")
    assert loaded.backbone.default_k == 600
    again = _pt(loaded, seed=0, mode="tuned")  # the saved bank is tuned mode's default
    torch.testing.assert_close(again, tuned)
    assert (again - _pt(loaded, seed=0)).abs().max() > 1e-4


# ------------------------------------------------------------------------------ banks vs the call
def test_a_bank_used_off_its_k_scale_or_size_is_named_in_a_warning(sd, tiny_sd, caplog):
    bank = UpsamplerBank.for_unet(tiny_sd.unet, scale=16.0, K=500, train_size=[256, 256])
    with caplog.at_level(logging.WARNING, logger="selfcascade.pipeline"):
        _pt(sd, seed=0, mode="tuned", upsamplers=bank)
    text = caplog.text
    assert "tuned at K=500, this call re-noises pivots to K=700" in text
    assert "tuned for 16x pixels per stage, this stage grows 4x" in text
    assert "tuned at 256 px, this stage is 64 px" in text
    caplog.clear()
    fitting = UpsamplerBank.for_unet(tiny_sd.unet, scale=4.0, K=700, train_size=[64, 64])
    with caplog.at_level(logging.WARNING, logger="selfcascade.pipeline"):
        _pt(sd, seed=0, mode="tuned", upsamplers=fitting)
    assert "upsampler bank" not in caplog.text


# ------------------------------------------------------------------------------ CUDA only (skipped on CPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_fp16_with_model_offload_matches_the_resident_pipeline(tiny_sd_fresh):
    """fp16 on the GPU: weights offloaded to the CPU between forwards, latents and CUDA generators on the GPU."""
    pipe = tiny_sd_fresh.to("cuda", torch.float16)
    reference = _pt(SelfCascadePipeline.from_pipe(pipe), seed=0)
    pipe.to("cpu")
    pipe.enable_model_cpu_offload()
    cascade = SelfCascadePipeline.from_pipe(pipe)
    assert cascade.backbone.device.type == "cuda" and next(pipe.unet.parameters()).device.type == "cpu"
    torch.testing.assert_close(_pt(cascade, seed=0), reference, atol=2e-3, rtol=0)


@cuda
def test_cuda_generator_and_sequential_offload(tiny_sd_fresh):
    pipe = tiny_sd_fresh.to(dtype=torch.float16)
    pipe.enable_sequential_cpu_offload()
    cascade = SelfCascadePipeline.from_pipe(pipe)
    a = _pt(cascade, generator=torch.Generator("cuda").manual_seed(0))
    b = _pt(cascade, generator=torch.Generator("cuda").manual_seed(0))
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a).all()
