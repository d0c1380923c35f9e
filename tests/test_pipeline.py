"""``SelfCascadePipeline``: shapes, seeds, modes, guidance, SDXL conditioning, VAE memory measures, errors.

Fast tests on the tiny offline pipelines (native 32x32 px, sides multiple of 4), 2-3 steps, targets
of 64 px (4x pixels) or 128 px (16x pixels).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from selfcascade import CascadeOutput, SelfCascadePipeline, UpsamplerBank

PROMPT = "a red apple"
FAST = dict(num_inference_steps=2, progress=False)


def _np(cascade, prompt=PROMPT, height=64, width=64, seed=0, **kwargs):
    out = cascade(prompt, height, width, seed=seed, output_type="np", **FAST, **kwargs)
    return out.images


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return SelfCascadePipeline.from_pipe(tiny_sd)


@pytest.fixture(scope="module")
def sd_64(sd):
    """The reference run: tuning-free 32 -> 64, seed 0, CFG 7.5, 2 steps, every stage returned."""
    return sd(PROMPT, 64, 64, seed=0, output_type="np", return_stages=True, **FAST)


# ------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize(
    "fixture,height,width,stages",
    [
        ("tiny_sd", 64, 64, ((32, 32), (64, 64))),
        ("tiny_sd", 64, 128, ((24, 44), (40, 76), (64, 128))),
        ("tiny_sd_v", 64, 64, ((32, 32), (64, 64))),
        ("tiny_sd_v", 128, 128, ((32, 32), (64, 64), (128, 128))),
        ("tiny_sd_v", 128, 64, ((44, 24), (76, 40), (128, 64))),
        ("tiny_sdxl", 64, 64, ((32, 32), (64, 64))),
        ("tiny_sdxl", 128, 128, ((32, 32), (64, 64), (128, 128))),
        ("tiny_sdxl", 64, 128, ((24, 44), (40, 76), (64, 128))),
    ],
)
def test_stage_sizes_and_output_shapes(fixture, height, width, stages, request):
    cascade = SelfCascadePipeline.from_pipe(request.getfixturevalue(fixture))
    out = cascade(PROMPT, height, width, seed=0, output_type="np", return_stages=True, **FAST)
    assert isinstance(out, CascadeOutput)
    assert out.plan.stages == stages
    assert out.settings["stages"] == [list(s) for s in stages]
    assert out.images.shape == (1, height, width, 3)
    assert [s.shape for s in out.stages] == [(1, h, w, 3) for h, w in stages]
    np.testing.assert_array_equal(out.stages[-1], out.images)
    for image in out.stages:
        assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0
        assert image.std() > 0.01  # not a flat image
    assert out.seeds == [0]


def test_output_types_agree(sd, sd_64):
    kwargs = dict(seed=0, return_stages=True, **FAST)
    pt = sd(PROMPT, 64, 64, output_type="pt", **kwargs)
    pil = sd(PROMPT, 64, 64, output_type="pil", **kwargs)
    latent = sd(PROMPT, 64, 64, output_type="latent", **kwargs)

    assert isinstance(pt.images, torch.Tensor) and pt.images.shape == (1, 3, 64, 64)
    assert [tuple(s.shape) for s in pt.stages] == [(1, 3, 32, 32), (1, 3, 64, 64)]
    np.testing.assert_array_equal(pt.images.permute(0, 2, 3, 1).numpy(), sd_64.images)

    assert isinstance(pil.images, list) and len(pil.images) == 1 and isinstance(pil.images[0], Image.Image)
    assert [im.size for im in (pil.images[0], pil.stages[0][0])] == [(64, 64), (32, 32)]
    np.testing.assert_array_equal(np.asarray(pil.images[0]), np.round(sd_64.images[0] * 255).astype(np.uint8))

    assert [tuple(s.shape) for s in latent.stages] == [(1, 4, 16, 16), (1, 4, 32, 32)]
    assert latent.images is latent.stages[-1]
    decoded = sd.backbone.decode(latent.images).detach().permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(decoded, sd_64.images, atol=1e-6)


def test_return_stages_off_returns_only_the_target(sd, sd_64):
    out = sd(PROMPT, 64, 64, seed=0, output_type="np", **FAST)
    assert out.stages == []
    np.testing.assert_array_equal(out.images, sd_64.images)


# -------------------------------------------------------------------------------- seeds
def test_same_seed_same_image_other_seed_differs(sd, sd_64):
    np.testing.assert_array_equal(_np(sd, seed=0), sd_64.images)
    other = _np(sd, seed=1)
    assert np.abs(other - sd_64.images).max() > 1e-2


def test_each_image_of_a_batch_has_its_own_seed(sd):
    batch = sd(PROMPT, 64, 64, seed=[11, 7], num_images_per_prompt=2, output_type="np", **FAST)
    assert batch.seeds == [11, 7]
    # equal up to float round-off: batched convolutions sum in another order than single ones
    np.testing.assert_allclose(batch.images[1], _np(sd, seed=7)[0], atol=1e-4)
    np.testing.assert_allclose(batch.images[0], _np(sd, seed=11)[0], atol=1e-4)
    assert np.abs(batch.images[0] - batch.images[1]).max() > 1e-2
    # an int seed gives image i the seed seed + i
    assert sd(PROMPT, 64, 64, seed=5, num_images_per_prompt=2, output_type="latent", **FAST).seeds == [5, 6]


def test_no_seed_draws_seeds_that_regenerate_the_images(sd):
    first = sd(PROMPT, 64, 64, seed=None, num_images_per_prompt=2, output_type="latent", **FAST)
    assert len(first.seeds) == 2 and all(isinstance(s, int) for s in first.seeds)
    again = sd(PROMPT, 64, 64, seed=first.seeds, num_images_per_prompt=2, output_type="latent", **FAST)
    torch.testing.assert_close(again.images, first.images, rtol=0, atol=0)


def test_stage0_does_not_depend_on_the_rest_of_the_plan(sd, sd_64):
    """Stage 0 of the cascade to 64 == stage 0 of the cascade to 128 == a direct run at the base size."""
    to_128 = sd(PROMPT, 128, 128, seed=0, output_type="latent", return_stages=True, **FAST)
    direct_32 = sd(PROMPT, 32, 32, seed=0, mode="direct", output_type="latent", **FAST)
    torch.testing.assert_close(direct_32.images, to_128.stages[0], rtol=0, atol=0)
    for r in (0, 1):  # stage 1 too: the same size in both plans
        decoded = sd.backbone.decode(to_128.stages[r]).detach().permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(decoded, sd_64.stages[r])
    assert to_128.stages[2].shape == (1, 4, 64, 64)


@pytest.mark.parametrize("fixture,size", [("tiny_sd", 32), ("tiny_sd", 64), ("tiny_sd_v", 32), ("tiny_sdxl", 32)])
def test_direct_mode_reproduces_the_diffusers_pipeline(fixture, size, request):
    """Direct inference is the baseline: one stage at the target, the same as diffusers' own call."""
    pipe = request.getfixturevalue(fixture)
    out = SelfCascadePipeline.from_pipe(pipe)(PROMPT, size, size, mode="direct", seed=3, output_type="np",
                                              return_stages=True, **FAST)
    assert out.plan.stages == ((size, size),) and len(out.stages) == 1
    reference = pipe(PROMPT, height=size, width=size, num_inference_steps=2, guidance_scale=7.5, output_type="np",
                     generator=torch.Generator().manual_seed(3)).images
    np.testing.assert_allclose(out.images, reference, atol=1e-5)


def test_direct_differs_from_tuning_free(sd, sd_64):
    direct = sd(PROMPT, 64, 64, mode="direct", seed=0, output_type="np", **FAST)
    assert direct.plan.num_stages == 1 and direct.settings["mode"] == "direct"
    assert direct.images.shape == sd_64.images.shape
    assert np.abs(direct.images - sd_64.images).max() > 1e-2


def test_from_pretrained_folder_matches_from_pipe(tiny_sd_dir, sd, sd_64):
    loaded = SelfCascadePipeline.from_pretrained(tiny_sd_dir, device="cpu")
    assert type(loaded.backbone) is type(sd.backbone)
    assert type(loaded.backbone.scheduler) is DDIMScheduler
    assert loaded.backbone.dtype == torch.float32
    np.testing.assert_array_equal(_np(loaded, seed=0), sd_64.images)


# ------------------------------------------------------------------- prompts and guidance
def _unet_batch_sizes(unet):
    sizes: list[int] = []
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append((args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    return sizes, handle


def test_per_stage_guidance(sd, sd_64, tiny_sd):
    sizes, handle = _unet_batch_sizes(tiny_sd.unet)
    try:
        out = sd(PROMPT, 64, 64, seed=0, guidance_scale=[7.5, 1.0], output_type="np", return_stages=True, **FAST)
    finally:
        handle.remove()
    assert sizes == [2, 2, 1, 1]  # CFG doubles the batch at stage 0 only
    assert out.settings["guidance_scale"] == [7.5, 1.0]
    np.testing.assert_array_equal(out.stages[0], sd_64.stages[0])  # stage 0 used the same 7.5
    assert np.abs(out.images - sd_64.images).max() > 1e-3  # stage 1 did not


def test_model_default_guidance_can_differ_at_later_stages(tiny_sd):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    cascade.backbone.default_refine_guidance_scale = 1.0
    out = cascade(PROMPT, 128, 128, seed=0, output_type="np", **FAST)
    assert out.settings["guidance_scale"] == [7.5, 1.0, 1.0]
    assert cascade(PROMPT, 128, 128, seed=0, output_type="np", guidance_scale=3.0, **FAST).settings[
        "guidance_scale"] == [3.0, 3.0, 3.0]  # a caller's value applies to every stage


def test_no_guidance_runs_without_negative_branch(sd, tiny_sd):
    sizes, handle = _unet_batch_sizes(tiny_sd.unet)
    try:
        images = _np(sd, guidance_scale=1.0)
    finally:
        handle.remove()
    assert sizes == [1, 1, 1, 1]
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_negative_prompt_changes_the_image(sd, sd_64):
    out = sd(PROMPT, 64, 64, seed=0, negative_prompt="blurry", output_type="np", **FAST)
    assert out.settings["negative_prompt"] == ["blurry"]
    assert np.abs(out.images - sd_64.images).max() > 1e-3


def test_several_prompts_and_images_per_prompt(sd):
    out = sd(["a red apple", "the sea"], 64, 64, seed=20, num_images_per_prompt=2, output_type="np", **FAST)
    assert out.images.shape == (4, 64, 64, 3)
    assert out.seeds == [20, 21, 22, 23]
    # layout is prompt-major: [p0 s20, p0 s21, p1 s22, p1 s23]; any image can be regenerated alone
    np.testing.assert_allclose(out.images[2], _np(sd, "the sea", seed=22)[0], atol=1e-4)
    np.testing.assert_allclose(out.images[1], _np(sd, "a red apple", seed=21)[0], atol=1e-4)


# ----------------------------------------------------------------------------------- SDXL
def test_sdxl_time_ids_carry_each_stage_size(tiny_sdxl):
    seen: list[tuple[tuple[int, int], torch.Tensor]] = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        seen.append((tuple(sample.shape[-2:]), kwargs["added_cond_kwargs"]["time_ids"].clone()))

    handle = tiny_sdxl.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = SelfCascadePipeline.from_pipe(tiny_sdxl)(PROMPT, 64, 128, seed=0, output_type="latent", **FAST)
    finally:
        handle.remove()
    assert out.plan.stages == ((24, 44), (40, 76), (64, 128))
    assert len(seen) == 2 * out.plan.num_stages
    for latent_hw, time_ids in seen:
        h, w = latent_hw[0] * 2, latent_hw[1] * 2  # tiny VAE: 2 px per latent
        assert time_ids.shape == (2, 6)  # CFG batch
        expected = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=time_ids.dtype)
        torch.testing.assert_close(time_ids, expected, rtol=0, atol=0)
    assert sorted({hw for hw, _ in seen}) == [(12, 22), (20, 38), (32, 64)]


# ------------------------------------------------------------------------------- memory
def test_vae_tiling_above_threshold_and_flags_restored(tiny_sd_fresh, monkeypatch):
    vae = tiny_sd_fresh.vae
    flags: list[tuple[tuple[int, int], bool, bool]] = []
    tiled: list[tuple[int, ...]] = []
    decode, tiled_decode = vae.decode, vae.tiled_decode

    def spy_decode(z, *args, **kwargs):
        flags.append((tuple(z.shape[-2:]), vae.use_tiling, vae.use_slicing))
        return decode(z, *args, **kwargs)

    def spy_tiled(z, *args, **kwargs):
        tiled.append(tuple(z.shape))
        return tiled_decode(z, *args, **kwargs)

    monkeypatch.setattr(vae, "decode", spy_decode)
    monkeypatch.setattr(vae, "tiled_decode", spy_tiled)
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh, vae_tile_above=32 * 32)
    assert (vae.use_tiling, vae.use_slicing) == (False, False)

    cascade(PROMPT, 64, 64, seed=0, return_stages=True, output_type="np", **FAST)
    assert flags == [((16, 16), False, False), ((32, 32), True, False)]  # 32x32 px is not above 32*32
    assert tiled == [(1, 4, 32, 32)]
    assert (vae.use_tiling, vae.use_slicing) == (False, False)

    # batches decode in slices; settings the user chose survive the call
    flags.clear()
    vae.enable_tiling()
    cascade(PROMPT, 64, 64, seed=[0, 1], num_images_per_prompt=2, output_type="np", **FAST)
    assert flags == [((32, 32), True, True)]
    assert (vae.use_tiling, vae.use_slicing) == (True, False)


def test_default_threshold_does_not_tile_small_images(tiny_sd_fresh, monkeypatch):
    vae = tiny_sd_fresh.vae
    calls = []
    monkeypatch.setattr(vae, "tiled_decode", lambda *a, **k: calls.append(1))
    SelfCascadePipeline.from_pipe(tiny_sd_fresh)(PROMPT, 64, 64, seed=0, output_type="np", **FAST)
    assert calls == []


# ------------------------------------------------------------------ the user's pipe is left alone
def test_users_pipe_is_unchanged(tiny_sd):
    scheduler = tiny_sd.scheduler
    config = dict(scheduler.config)
    steps = scheduler.num_inference_steps
    for choice in ("ddim", DPMSolverMultistepScheduler.from_config(config)):
        cascade = SelfCascadePipeline.from_pipe(tiny_sd, scheduler=choice)
        assert cascade.backbone.scheduler is not scheduler
        cascade(PROMPT, 64, 64, seed=0, output_type="latent", **FAST)
        assert tiny_sd.scheduler is scheduler and type(tiny_sd.scheduler) is DDIMScheduler
        assert dict(tiny_sd.scheduler.config) == config
        assert tiny_sd.scheduler.num_inference_steps == steps
        assert (tiny_sd.vae.use_tiling, tiny_sd.vae.use_slicing) == (False, False)
    # "pipeline" keeps (and shares) the pipe's own scheduler
    assert SelfCascadePipeline.from_pipe(tiny_sd, scheduler="pipeline").backbone.scheduler is scheduler


def test_wrapping_leaves_training_flags_and_freeze_sets_them(tiny_sd_fresh):
    pipe = tiny_sd_fresh
    pipe.unet.train()
    cascade = SelfCascadePipeline.from_pipe(pipe)
    assert pipe.unet.training and all(p.requires_grad for p in pipe.unet.parameters())
    cascade.backbone.freeze()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(height=16, width=16), r"fewer pixels than the base size 32x32.*mode='direct'"),
        # the target takes any multiple of the VAE factor (2 here, 8 on SD), as diffusers' pipelines do
        (dict(height=65, width=64), r"height=65 is not a multiple of 2.*use 64 or 66"),
        # an explicit 0 must be refused, not silently replaced by the default size
        (dict(height=64, width=0), r"width must be a positive integer, got 0"),
        (dict(height=1024, width=1024), r"1024x the base.*limit of 256x.*max_ratio"),
        (dict(mode="fast"), r"mode must be one of tuning-free, direct.*got 'fast'"),
        (dict(num_inference_steps=0), r"num_inference_steps must be a positive integer, got 0"),
        (dict(num_inference_steps=2.5), r"num_inference_steps must be a positive integer, got 2.5"),
        (dict(num_images_per_prompt=0), r"num_images_per_prompt must be a positive integer"),
        (dict(K=0), r"K must be an integer in \[1, 1000\], got 0"),
        (dict(K=1001), r"K must be an integer in \[1, 1000\], got 1001"),
        (dict(K=700.5), r"K must be an integer"),
        (dict(K=500, noise_level=0.5), r"either K or noise_level, not both"),
        (dict(noise_level=0.0), r"noise_level must lie in \(0, 1\], got 0.0"),
        (dict(noise_level=1.5), r"noise_level must lie in \(0, 1\], got 1.5"),
        (dict(seed=[0, 1]), r"got 2 seeds for 1 images"),
        (dict(seed=[0], num_images_per_prompt=2), r"got 1 seeds for 2 images"),
        (dict(guidance_scale=[7.5]), r"got 1 guidance scales for a 2-stage plan"),
        (dict(guidance_scale=[7.5, 5.0, 3.0]), r"got 3 guidance scales for a 2-stage plan"),
        (dict(pivot_space="pixels"), r"pivot_space must be 'latent' or 'pixel', got 'pixels'"),
        (dict(output_type="jpeg"), r"output_type must be one of pil, np, pt, latent"),
        (dict(prompt=[]), r"prompt must be a string or a non-empty list"),
        (dict(negative_prompt=["a", "b"]), r"got 2 negative prompts for 1 prompts"),
        (dict(batch_size=0), r"batch_size must be a positive integer, got 0"),
        (dict(generator=torch.Generator()), r"give seed .* or generator, not both"),
        (dict(seed=None, generator=[torch.Generator()] * 2), r"got 2 generators for 1 images"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), r"give prompt or prompt_embeds, not both"),
        (dict(prompt=None), r"give a prompt .* or prompt_embeds"),
        (dict(pooled_prompt_embeds=torch.zeros(1, 32)), r"takes no pooled_prompt_embeds"),
        (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), r"can name latents; got prompt_embeds"),
        (dict(mode="demofusion", cross_attention_kwargs={"scale": 0.5}), r"takes? no cross_attention_kwargs"),
    ],
)
def test_bad_call_arguments_get_clear_errors(sd, tiny_sd, kwargs, message):
    kwargs = {"prompt": PROMPT, "height": 64, "width": 64, "seed": 0, **FAST, **kwargs}
    sizes, handle = _unet_batch_sizes(tiny_sd.unet)
    try:
        with pytest.raises(ValueError, match=message):
            sd(**kwargs)
    finally:
        handle.remove()
    assert sizes == []  # rejected before any sampling


def test_max_ratio_can_be_raised(tiny_sd):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd)
    cascade.max_ratio = 2048
    assert cascade.plan(1024, 1024).num_stages == 6


def test_unsupported_pipeline_type(tiny_sd_fresh):
    img2img = StableDiffusionImg2ImgPipeline(**tiny_sd_fresh.components, requires_safety_checker=False)
    with pytest.raises(ValueError, match=r"StableDiffusionImg2ImgPipeline is not supported yet.*StableDiffusionPipeline"):
        SelfCascadePipeline.from_pipe(img2img)
    with pytest.raises(ValueError, match=r"SimpleNamespace is not supported yet"):
        SelfCascadePipeline.from_pipe(SimpleNamespace(scheduler=tiny_sd_fresh.scheduler))


def test_scheduler_without_add_noise(tiny_sd):
    inverse = DDIMInverseScheduler.from_config(tiny_sd.scheduler.config)
    with pytest.raises(ValueError, match=r"DDIMInverseScheduler cannot drive the cascade: it lacks add_noise.*DDIMScheduler"):
        SelfCascadePipeline.from_pipe(tiny_sd, scheduler=inverse)
    with pytest.raises(ValueError, match=r"unknown scheduler 'heun'; choose one of ddim, euler, euler-a, dpm\+\+-2m, "
                                         r"dpm\+\+-2m-karras, unipc, pipeline"):
        SelfCascadePipeline.from_pipe(tiny_sd, scheduler="heun")


def test_from_pretrained_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match=r"has no model_index.json.*save_pretrained"):
        SelfCascadePipeline.from_pretrained(tmp_path, device="cpu")


def test_image_is_upscaled_in_place_of_stage0(sd):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = sd(PROMPT, 64, 64, seed=0, output_type="latent", return_stages=True, image=image, **FAST)
    torch.testing.assert_close(out.stages[0], sd.backbone.encode(image))  # stage 0 is the given image, not sampled
    sampled = sd(PROMPT, 64, 64, seed=0, output_type="latent", **FAST)
    assert not torch.allclose(out.images, sampled.images)  # the later stage starts from it
    with pytest.raises(ValueError, match=r"do not fit stage 0.*32x32 px"):
        sd(PROMPT, 64, 64, seed=0, image=torch.rand(1, 3, 48, 48), **FAST)
    with pytest.raises(ValueError, match="mode='direct' has none"):
        sd(PROMPT, 64, 64, seed=0, mode="direct", image=image, **FAST)


def test_weights_fingerprint_follows_the_unet_the_vae_and_the_banks(tiny_sd_fresh):
    cascade = SelfCascadePipeline.from_pipe(tiny_sd_fresh)
    bank = UpsamplerBank.for_unet(cascade.backbone.unet)
    before = cascade.weights_fingerprint(64, 64)
    assert before == cascade.weights_fingerprint(128, 128, "direct")  # weights, not settings
    tuned = cascade.weights_fingerprint(64, 64, "tuned", bank)
    assert tuned != before
    with torch.no_grad():
        next(bank.parameters()).add_(0.1)
    assert cascade.weights_fingerprint(64, 64, "tuned", bank) != tuned
    with torch.no_grad():
        cascade.backbone.unet.conv_out.weight.add_(1e-3)  # one small training-like step on a layer
    moved = cascade.weights_fingerprint(64, 64)
    assert moved != before
    with torch.no_grad():
        cascade.backbone.vae.decoder.conv_out.weight.add_(1e-3)  # a decoder fine-tune
    assert cascade.weights_fingerprint(64, 64) != moved


# ------------------------------------------------------------------- a model folder's own settings
def test_model_folder_settings_and_scale_cue(tmp_path):
    """``selfcascade.json`` beside a stock folder sets K and guidance; its scale cue changes the prompt of the
    stages above the base size only (stage 0 is the plain prompt, as without a cue)."""
    import json

    from selfcascade.testing import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "pipe")
    plain = SelfCascadePipeline.from_pretrained(folder, device="cpu")
    (folder / "selfcascade.json").write_text(json.dumps(
        {"K": 300, "guidance_scale": 5.0, "refine_guidance_scale": 1.0, "zoom_cue": "{prompt}, {zoom}x zoom",
         "zoom_factors": [2, 4]}))
    cued = SelfCascadePipeline.from_pretrained(folder, device="cpu")
    bb = cued.backbone
    assert (bb.default_k, bb.stage_guidance(2)) == (300, [5.0, 1.0])
    assert [bb.stage_zoom(s, s) for s in (32, 40, 64, 128, 256)] == [1, 1, 2, 4, 4]
    assert plain.backbone.stage_zoom(64, 64) == 1
    kwargs = dict(K=300, guidance_scale=[5.0, 1.0], return_stages=True)
    a = plain(PROMPT, 64, 64, seed=0, output_type="np", **FAST, **kwargs)
    b = cued(PROMPT, 64, 64, seed=0, output_type="np", **FAST, **kwargs)
    assert b.settings["zoom_cue"] == "{prompt}, {zoom}x zoom" and "zoom_cue" not in a.settings
    np.testing.assert_array_equal(a.stages[0], b.stages[0])
    assert np.abs(a.images - b.images).max() > 1e-4
    # the cued stage is the plain model upscaling the same pivot with the cued prompt
    pivot = torch.from_numpy(a.stages[0]).permute(0, 3, 1, 2)
    kwargs.pop("return_stages")
    by_hand = plain(f"{PROMPT}, 2x zoom", 64, 64, seed=0, output_type="np", image=pivot, **FAST, **kwargs)
    by_cue = cued(PROMPT, 64, 64, seed=0, output_type="np", image=pivot, **FAST, **kwargs)
    np.testing.assert_allclose(by_hand.images, by_cue.images, atol=1e-6)
    bb.zoom_cue = None  # a cue can be switched off per pipeline
    np.testing.assert_allclose(cued(PROMPT, 64, 64, seed=0, output_type="np", **FAST, **kwargs).images, a.images,
                               atol=1e-6)


def test_model_folder_pivot_space_is_the_cascade_default(tmp_path):
    """``"pivot_space": "pixel"`` in ``selfcascade.json`` makes the cascade modes upsample pivots in pixels unless
    the caller says otherwise; other modes keep their own; a bad value is refused naming the file; caches keyed by
    ``weights_fingerprint`` see the change."""
    import json

    from selfcascade.testing import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "pipe")
    latent = SelfCascadePipeline.from_pretrained(folder, device="cpu")
    (folder / "selfcascade.json").write_text(json.dumps({"pivot_space": "pixel"}))
    pixel = SelfCascadePipeline.from_pretrained(folder, device="cpu")
    assert pixel.backbone.model_settings()["pivot_space"] == "pixel" and "pivot_space" not in latent.backbone.model_settings()
    assert pixel.weights_fingerprint(64, 64) != latent.weights_fingerprint(64, 64)
    bank = UpsamplerBank.for_unet(latent.backbone.unet)
    for mode, extra in (("tuning-free", {}), ("tuned", {"upsamplers": bank})):
        out = pixel(PROMPT, 64, 64, seed=0, mode=mode, output_type="np", **extra, **FAST)
        assert out.settings["pivot_space"] == "pixel"
        by_hand = latent(PROMPT, 64, 64, seed=0, mode=mode, output_type="np", pivot_space="pixel", **extra, **FAST)
        np.testing.assert_allclose(out.images, by_hand.images, atol=1e-6)
    assert pixel(PROMPT, 64, 64, seed=0, output_type="np", pivot_space="latent", **FAST).settings["pivot_space"] == "latent"
    assert pixel(PROMPT, 64, 64, seed=0, mode="demofusion", output_type="np", **FAST).settings["pivot_space"] == "latent"
    (folder / "selfcascade.json").write_text(json.dumps({"pivot_space": "pixels"}))
    with pytest.raises(ValueError, match="selfcascade.json: pivot_space must be 'latent' or 'pixel'"):
        SelfCascadePipeline.from_pretrained(folder, device="cpu")
