"""Inflate a text-to-image ``UNet2DConditionModel`` into diffusers' stock ``UNet3DConditionModel``.

A video model trained from an image model starts out as that image model applied to every frame: the
spatial weights are copied as they are, and the temporal layers the 3D UNet adds (a temporal convolution
after every resnet, a temporal transformer after every spatial one and after ``conv_in``) start as
identities. Video training then only has to learn motion, not the images again.

One layout difference cannot always be bridged. A 2D UNet fixes each attention level's head *count*; the
stock 3D UNet fixes one head *width* for every level (its ``attention_head_dim``, from which each level's
count is its channels / width; ``transformer_in`` takes the same value, so a per-level tuple is rejected).
An image UNet with one head width everywhere (the v2 model: attention at one width only) inflates exactly.
SD 1.5's layout, 8 heads at every width, has a different width per level; there ``head_dim`` picks the
stock UNet's width, and the levels whose split changes attend differently with the same weights until
video training adapts them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import torch

logger = logging.getLogger(__name__)

#: 2D config keys the 3D UNet takes as they are.
_CARRIED = ("sample_size", "in_channels", "out_channels", "block_out_channels", "layers_per_block",
            "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
            "cross_attention_dim", "time_cond_proj_dim")
#: 2D config keys handled here: heads become one head width, linear attention projections 1x1 convolutions
#: (the added-embedding head count means nothing without an added embedding, which is checked).
_CONVERTED = ("down_block_types", "up_block_types", "attention_head_dim", "num_attention_heads",
              "use_linear_projection", "addition_embed_type_num_heads")


def attention_levels(config: Mapping) -> list[tuple[int, int]]:
    """(channels, heads) of every attention block of a UNet2DConditionModel config, down, mid and up."""
    # diffusers' 2D UNet reads attention_head_dim as the head count when num_attention_heads is unset.
    heads = config.get("num_attention_heads") or config["attention_head_dim"]
    widths, down, up = config["block_out_channels"], config["down_block_types"], config["up_block_types"]
    per_block = [heads] * len(widths) if isinstance(heads, int) else list(heads)
    levels = [(w, h) for w, h, kind in zip(widths, per_block, down) if "CrossAttn" in kind]
    levels.append((widths[-1], per_block[-1]))  # the mid block
    levels += [(w, h) for w, h, kind in zip(widths[::-1], per_block[::-1], up) if "CrossAttn" in kind]
    return levels


def video_config(config: Mapping, head_dim: int | None = None) -> dict:
    """The UNet3DConditionModel config that holds a UNet2DConditionModel ``config``'s weights.

    ``head_dim``: the 3D UNet's one head width, needed when the 2D UNet's head widths differ between levels;
    without it every level must already share one width (then the inflated UNet is exact).
    """
    _check_expressible(config)
    levels = attention_levels(config)
    widths = sorted({channels // heads for channels, heads in levels})
    if any(channels % heads for channels, heads in levels):
        raise ValueError(f"attention heads must divide their channels, got (channels, heads) {levels}.")
    if head_dim is None:
        if len(widths) > 1:
            raise ValueError(
                f"a stock UNet3DConditionModel gives every attention level one head width; this UNet's heads are "
                f"{'/'.join(map(str, widths))} channels wide at (channels, heads) {sorted(set(levels))}: choose one "
                "width (head_dim), which changes the head split of the other levels.")
        head_dim = widths[0]
    if any(channels % head_dim for channels, _ in levels):
        raise ValueError(f"head width {head_dim} must divide every attention level's channels "
                         f"{sorted({c for c, _ in levels})}.")
    return {
        **{k: _plain(config[k]) for k in _CARRIED if k in config},
        "down_block_types": [kind.replace("2D", "3D") for kind in config["down_block_types"]],
        "up_block_types": [kind.replace("2D", "3D") for kind in config["up_block_types"]],
        "attention_head_dim": head_dim,
    }


def changed_head_splits(config: Mapping, head_dim: int) -> list[str]:
    """The attention widths whose head count a 3D UNet of head width ``head_dim`` changes, e.g. '32: 8 -> 2 heads'."""
    return [f"{channels}: {heads} -> {channels // head_dim} heads"
            for channels, heads in sorted(set(attention_levels(config))) if channels // heads != head_dim]


def inflate_weights(config: Mapping, weights: Mapping[str, torch.Tensor], head_dim: int | None = None):
    """A UNet3DConditionModel holding the 2D ``weights`` of a UNet2DConditionModel ``config``, its temporal layers
    identities: it computes what the 2D UNet computes on every frame (exactly where the head split is kept)."""
    from diffusers import UNet3DConditionModel
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    config3d = video_config(config, head_dim)
    changed = changed_head_splits(config, config3d["attention_head_dim"])
    if changed:
        logger.warning("inflating with head width %d changes the head split at widths %s: those levels start out "
                       "attending differently from the image UNet", config3d["attention_head_dim"], ", ".join(changed))
    unet3d = UNet3DConditionModel(**config3d)
    own = unet3d.state_dict()
    # Linear attention projections (use_linear_projection) become the 3D blocks' 1x1 convolutions.
    weights = {k: v.reshape(own[k].shape) if k in own else v for k, v in weights.items()}
    result = unet3d.load_state_dict(weights, strict=False)
    not_temporal = [k for k in result.missing_keys if not k.startswith("transformer_in.")
                    and ".temp_convs." not in k and ".temp_attentions." not in k]
    if result.unexpected_keys or not_temporal:
        raise ValueError(f"cannot inflate this UNet: weights {result.unexpected_keys[:3]} have no 3D counterpart and "
                         f"{not_temporal[:3]} no 2D source.")
    # diffusers zero-initialises the temporal convolutions' last layer; the temporal transformers' outputs are
    # zeroed here, which makes each a residual identity.
    for module in unet3d.modules():
        if isinstance(module, TransformerTemporalModel):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    return unet3d


def inflate_unet(unet2d: torch.nn.Module, head_dim: int | None = None):
    """``inflate_weights`` of a UNet2DConditionModel."""
    return inflate_weights(unet2d.config, unet2d.state_dict(), head_dim)


def _check_expressible(config: Mapping) -> None:
    """Refuse 2D features the 3D UNet has no place for (class or added embeddings, other time embeddings, ...)."""
    from diffusers import UNet2DConditionModel

    defaults = {name: p.default for name, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items()
                if name != "self" and name not in _CARRIED and name not in _CONVERTED}
    differ = sorted(k for k, default in defaults.items() if k in config and _plain(config[k]) != _plain(default))
    if differ:
        raise ValueError(f"a UNet3DConditionModel cannot express this UNet's {', '.join(differ)} "
                         f"({', '.join(repr(config[k]) for k in differ)}); inflation needs diffusers' defaults there.")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
