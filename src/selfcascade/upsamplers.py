"""Time-aware feature upsamplers (paper Eq. 8-9): the only weights the tuned self-cascade learns.

One small upsampler per UNet resolution level maps the pivot's skip feature h_{n,0}^{r-1} (computed
once per stage at the previous size) to a residual for the same feature at the new size, at every
denoising step t. The output projection starts at zero, so an untrained bank adds exactly nothing and
the tuned cascade reproduces the tuning-free one bit for bit until training moves it.

To stay tiny (< 0.1% of the UNet) each upsampler works at ``width`` channels: a 1x1 projection down,
bilinear upsampling (done after the projection: both are linear per pixel, so the order does not
change the result but the cost drops by channels/width), two residual blocks whose normalised
activations are scaled and shifted by the UNet's own timestep embedding, and a 1x1 projection back up.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from .unet_layout import INJECTIONS, UNetLayout, unet_layout

logger = logging.getLogger(__name__)

#: Channels each upsampler works at, and of the shared time projection; chosen so a bank stays
#: under 0.1% of the smallest UNet we ship (the embedded 5.8M-parameter model).
DEFAULT_WIDTH = 4
DEFAULT_TIME_WIDTH = 4


class _TimeResBlock(nn.Module):
    """x + conv(silu(norm(x) * (1 + scale_t) + shift_t)): the step decides how the feature is used."""

    def __init__(self, width: int, time_width: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, width, affine=False)
        self.time = nn.Linear(time_width, 2 * width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor, time_features: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(time_features)[:, :, None, None].chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        return x + self.conv(F.silu(h))


class TimeAwareFeatureUpsampler(nn.Module):
    """phi_n: a pivot feature at the previous size -> a residual for that feature at the new size."""

    def __init__(self, channels: int, width: int = DEFAULT_WIDTH, time_width: int = DEFAULT_TIME_WIDTH) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.blocks = nn.ModuleList([_TimeResBlock(width, time_width) for _ in range(2)])
        self.proj_out = nn.Conv2d(width, channels, 1)
        # Zero output: an untrained upsampler must leave the frozen model's features untouched.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, feature: torch.Tensor, size: tuple[int, int], time_features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(feature)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for block in self.blocks:
            x = block(x, time_features)
        return self.proj_out(x)


class UpsamplerBank(ModelMixin, ConfigMixin):
    """One ``TimeAwareFeatureUpsampler`` per UNet level, plus what it was tuned on and for.

    ``save_pretrained``/``from_pretrained`` (folder or hub id) write and read ``config.json`` plus
    safetensors. ``level_channels`` and ``time_embed_dim`` must match the UNet the bank is used with
    (``check_compatible``); ``base_model``, ``scale`` (pixel ratio of one cascade stage it was tuned
    for, 4 = 2x per side), ``K``, ``train_size``, ``tuned_from``, ``train_steps`` and ``train_seconds`` (wall time of those steps) document
    its provenance.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        level_channels: Sequence[int],
        time_embed_dim: int,
        width: int = DEFAULT_WIDTH,
        time_width: int = DEFAULT_TIME_WIDTH,
        injection: str = "skip",
        base_model: str = "unknown",
        scale: float = 4.0,
        K: int = 700,
        train_size: Sequence[int] | None = None,
        tuned_from: str | None = None,
        train_steps: int = 0,
        train_seconds: float | None = None,
    ) -> None:
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {', '.join(INJECTIONS)}, got {injection!r}.")
        # The UNet's time embedding (what its own resnets are conditioned on), squeezed once for all levels.
        self.time_proj = nn.Linear(time_embed_dim, time_width)
        self.upsamplers = nn.ModuleList(
            [TimeAwareFeatureUpsampler(c, width, time_width) for c in level_channels]
        )

    @classmethod
    def for_unet(cls, unet: nn.Module, **config) -> "UpsamplerBank":
        """A zero-initialised bank shaped for ``unet`` (a diffusers UNet2D- or UNet3DConditionModel)."""
        layout = unet_layout(unet)
        return cls(level_channels=list(layout.level_channels), time_embed_dim=layout.time_embed_dim, **config)

    @property
    def num_levels(self) -> int:
        return len(self.upsamplers)

    @property
    def layout(self) -> UNetLayout:
        return UNetLayout(tuple(self.config.level_channels), self.config.time_embed_dim)

    def check_compatible(self, unet: nn.Module, model_name: str | None = None) -> None:
        """Raise a ValueError naming both sides when the bank was shaped for a different UNet."""
        expected = unet_layout(unet)
        if expected != self.layout:
            model = f"'{model_name}'" if model_name else "this model"
            raise ValueError(
                f"upsampler bank for '{self.config.base_model}' has {self.num_levels} levels with channels "
                f"{list(self.layout.level_channels)} and time embedding {self.layout.time_embed_dim}, but {model} "
                f"has {len(expected.level_channels)} levels with channels {list(expected.level_channels)} and "
                f"time embedding {expected.time_embed_dim}. Use a bank tuned for this model, or tune one with "
                "`selfcascade train-upsamplers --model ...`."
            )

    def forward(
        self, features: Sequence[torch.Tensor], temb: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Residuals for every level: ``features[n]`` upsampled to ``sizes[n]`` and transformed at ``temb``."""
        if len(features) != self.num_levels or len(sizes) != self.num_levels:
            raise ValueError(f"the bank has {self.num_levels} levels; got {len(features)} features and {len(sizes)} sizes.")
        time_features = F.silu(self.time_proj(F.silu(temb)))
        return [up(f, s, time_features) for up, f, s in zip(self.upsamplers, features, sizes)]


#: How far a stage's pixel ratio or side may stray from what a bank was tuned for before a call is warned.
SCALE_TOLERANCE = 0.25


def bank_mismatches(bank: UpsamplerBank, k: int, scale: float, size: tuple[int, int]) -> list[str]:
    """What differs between how ``bank`` was tuned and a stage that runs it (K, pixel ratio, side), both named."""
    config = bank.config
    problems = []
    if int(config.K) != k:
        problems.append(f"tuned at K={config.K}, this call re-noises pivots to K={k}")
    if abs(scale / float(config.scale) - 1) > SCALE_TOLERANCE:
        problems.append(f"tuned for {float(config.scale):g}x pixels per stage, this stage grows {scale:.2g}x")
    if config.train_size:
        trained, side = max(config.train_size), max(size)
        if abs(side / trained - 1) > SCALE_TOLERANCE:
            problems.append(f"tuned at {trained} px, this stage is {side} px")
    return problems


def load_bank(bank: "UpsamplerBank | str", **kwargs) -> UpsamplerBank:
    """A bank as given, or loaded from a folder or hub id."""
    if isinstance(bank, UpsamplerBank):
        return bank
    loaded = UpsamplerBank.from_pretrained(str(bank), **kwargs)
    logger.info("upsampler bank %s: %d parameters, tuned on %s for %gx pixels", bank,
                loaded.num_parameters(), loaded.config.base_model, loaded.config.scale)
    return loaded
