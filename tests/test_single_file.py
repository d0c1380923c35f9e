"""Single-file checkpoints (A1111/ComfyUI layout) load offline through ``--model FILE --config DIR``.

diffusers converts the original (CompVis/LDM) layout to its own but not back, so ``to_original_layout`` below
writes that layout for the tiny SD pipeline: the inverse of the renaming rules in diffusers'
``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``) for a UNet of down blocks with ``layers_per_block`` resnets (+ attentions),
a cross-attention mid block, and a KL-VAE with one mid attention.
"""

from __future__ import annotations

import pytest
import torch

from selfcascade.testing import make_tiny_sd, make_tiny_sd15, save_tiny_sd

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers name -> original name, inside a UNet resnet and a VAE mid-attention block
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    """One UNet parameter name in the original layout: input_blocks/middle_block/output_blocks numbering."""
    parts = key.split(".")
    module, leaf = key.rsplit(".", 1)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if parts[0] == "mid_block":  # resnets.0 -> 0, attentions.0 -> 1, resnets.1 -> 2
        kind, index, tail = parts[1], int(parts[2]), parts[3:]
        position = 1 if kind == "attentions" else 2 * index
        inner = _UNET_RESNET.get(tail[0], tail[0]) if kind == "resnets" else tail[0]
        return ".".join(["middle_block", str(position), inner, *tail[1:]])
    kind, block, tail = parts[0], int(parts[1]), parts[2:]
    down = kind == "down_blocks"
    group = "input_blocks" if down else "output_blocks"
    per_level = layers_per_block + 1  # entries per level: its layers, then a down/upsampler (down: 1 + conv_in)
    start = 1 + block * per_level if down else block * per_level
    if tail[0] in ("downsamplers", "upsamplers"):  # the level's last entry; an upsampler follows its attention
        entry = "0.op" if down else ("2.conv" if up_has_attention[block] else "1.conv")
        return f"{group}.{start + layers_per_block}.{entry}.{tail[-1]}"
    index = start + int(tail[1])
    if tail[0] == "resnets":
        return ".".join([group, str(index), "0", _UNET_RESNET.get(tail[2], tail[2]), *tail[3:]])
    return ".".join([group, str(index), "1", *tail[2:]])


def _vae_key(key: str, num_levels: int) -> str:
    """One VAE parameter name in the original layout: down.i.block.j / up.(reversed i).block.j / mid.block_k."""
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = key.replace("downsamplers.0", "downsample").replace("upsamplers.0", "upsample")
    key = key.replace("down_blocks.", "down.").replace("resnets.", "block.")
    if ".up_blocks." in key:
        side, rest = key.split(".up_blocks.")
        level, tail = rest.split(".", 1)
        key = f"{side}.up.{num_levels - 1 - int(level)}.{tail}"
    key = key.replace("mid_block.block.0", "mid.block_1").replace("mid_block.block.1", "mid.block_2")
    if "mid_block.attentions.0." in key:
        head, tail = key.split("mid_block.attentions.0.")
        name, leaf = tail.rsplit(".", 1)
        key = f"{head}mid.attn_1.{_VAE_ATTENTION[name]}.{leaf}"
    return key


def to_original_layout(pipe) -> dict[str, torch.Tensor]:
    """The state dict of one SD 1.x checkpoint file (UNet, VAE, CLIP text encoder) in the original key layout."""
    unet_config = pipe.unet.config
    up_has_attention = ["CrossAttn" in name for name in unet_config.up_block_types]
    state = {UNET_PREFIX + _unet_key(k, unet_config.layers_per_block, up_has_attention): v
             for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        original = _vae_key(key, len(pipe.vae.config.up_block_types))
        if ".mid.attn_1." in original and value.ndim == 2:  # the original's attention projections are 1x1 convs
            value = value[:, :, None, None]
        state[VAE_PREFIX + original] = value
    # the original keeps transformers' older CLIPTextModel names (under text_model.), which newer releases flatten
    state.update({CLIP_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.contiguous() for k, v in state.items()}


def _assert_same_weights(loaded: torch.nn.Module, original: torch.nn.Module) -> None:
    expected = original.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key].float(), value.float()), key


def test_original_layout_names_every_weight_once():
    pipe = make_tiny_sd()
    state = to_original_layout(pipe)
    total = sum(len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder))
    assert len(state) == total  # no two diffusers weights collapse onto one original name
    assert UNET_PREFIX + "output_blocks.1.2.conv.weight" in state  # upsampler after an up block's attention
    assert UNET_PREFIX + "input_blocks.2.0.op.weight" in state  # downsampler ends the first level


@pytest.mark.parametrize("build, suffix", [(make_tiny_sd, ".safetensors"), (make_tiny_sd, ".ckpt"),
                                          (make_tiny_sd15, ".safetensors")])  # sd15: levels without attention
def test_single_file_checkpoint_loads_offline_with_a_local_config(tmp_path, monkeypatch, build, suffix):
    from safetensors.torch import save_file

    from selfcascade import SelfCascadePipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = build(seed=5)  # other weights than the config folder's (seed 0): only the file can supply them
    config = save_tiny_sd(tmp_path / "config", pipe=build(seed=0))
    checkpoint = tmp_path / f"tiny{suffix}"
    state = to_original_layout(pipe)
    if suffix == ".safetensors":
        save_file(state, str(checkpoint))
    else:
        torch.save({"state_dict": state}, checkpoint)

    cascade = SelfCascadePipeline.from_pretrained(checkpoint, config=config, device="cpu", dtype=torch.float32)
    loaded = cascade.backbone.pipe
    _assert_same_weights(loaded.unet, pipe.unet)
    _assert_same_weights(loaded.vae, pipe.vae)
    _assert_same_weights(loaded.text_encoder, pipe.text_encoder)
    out = cascade("red apple", height=64, width=64, num_inference_steps=2, seed=0, output_type="np")
    assert out.images[0].shape == (64, 64, 3)


def test_cli_generates_from_a_single_file(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from selfcascade.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = save_tiny_sd(tmp_path / "config", seed=0)
    save_file(to_original_layout(make_tiny_sd(seed=5)), str(tmp_path / "tiny.safetensors"))
    out = tmp_path / "a.png"
    assert main(["generate", "red apple", "--model", str(tmp_path / "tiny.safetensors"), "--config", str(config),
                 "--size", "64", "--steps", "2", "--seeds", "0", "--device", "cpu", "--no-progress",
                 "-o", str(out)]) == 0
    assert out.is_file()
