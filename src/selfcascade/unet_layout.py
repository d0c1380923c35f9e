"""What a feature-upsampler bank must agree with in a UNet: each level's channels and the time-embedding width.

Kept apart from the hooks (``unet_features``) so the bank (``upsamplers``) can check a UNet without importing
them: imports point down, hooks -> bank -> layout.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

#: Where a bank's residuals go: the skip entries the up path concatenates, or the hidden state a block passes on.
INJECTIONS: tuple[str, ...] = ("skip", "hidden")


class UNetLayout(NamedTuple):
    """What an upsampler bank must agree with: channels of each level's feature, time embedding width."""

    level_channels: tuple[int, ...]
    time_embed_dim: int


def unet_layout(unet: nn.Module) -> UNetLayout:
    """Levels and channels of a diffusers UNet2DConditionModel (read from its modules, not its config)."""
    blocks = getattr(unet, "down_blocks", None)
    time_embedding = getattr(unet, "time_embedding", None)
    if blocks is None or time_embedding is None or not all(hasattr(b, "resnets") for b in blocks):
        raise ValueError(
            f"{type(unet).__name__} is not a diffusers UNet2DConditionModel-like model (needs down_blocks with "
            "resnets and a time_embedding); feature upsamplers cannot attach to it."
        )
    return UNetLayout(tuple(int(b.resnets[-1].out_channels) for b in blocks),
                      int(time_embedding.linear_2.out_features))
