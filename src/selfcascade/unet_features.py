"""Read the pivot's skip features out of a UNet and add upsampled residuals back in, through hooks.

No fork, subclass or copy of the UNet's forward: ``capture`` and ``inject`` are context managers that
register PyTorch hooks on an unchanged diffusers ``UNet2DConditionModel`` (or ``UNet3DConditionModel``) and
remove them on exit.

A *level* is one down block: its feature is the output of the block's last resnet (plus attention),
i.e. the deepest skip feature at that resolution and, at the same time, the hidden state the block
passes on (to its downsampler, or to the mid block for the last level). Two injection points:

- ``"skip"`` (the paper): the residual is added to that skip entry through diffusers' own
  ``down_block_additional_residuals``/``mid_block_additional_residual`` (the ControlNet mechanism),
  set by a forward pre-hook on the UNet; every other entry gets an exact zero.
- ``"hidden"`` (the official SDXL code): the residual is added to the hidden state the block passes
  on, by a pre-hook on the block's downsampler (or a forward hook on the last block).

The upsamplers are conditioned on the UNet's timestep embedding (``time_embedding(get_time_embed(t))``,
the one its resnets see, without SDXL's added text/size embedding), computed from the UNet's own modules.

Video UNets (``UNet3DConditionModel``, input [B, C, F, H, W]) fold the frames into the batch before their
down blocks, so their features, and the residuals added to them, have B*F rows: the bank runs per frame
on them as on a batch of images; only the time embedding is repeated per frame.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import nn

from .cascade import StageContext
from .upsamplers import UpsamplerBank


def _skip_indices(unet: nn.Module) -> tuple[list[int], int]:
    """Index of each level's feature in the UNet's ``down_block_res_samples``, and how many entries it has.

    The tuple starts with conv_in's output; each block appends one entry per resnet, then one for its
    downsampler.
    """
    indices, count = [], 1
    for block in unet.down_blocks:
        count += len(block.resnets)
        indices.append(count - 1)
        count += getattr(block, "downsamplers", None) is not None
    return indices, count


def level_sizes(unet: nn.Module, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each level's feature for a latent of ``height x width`` (stride-2 convs round up)."""
    sizes, h, w = [], height, width
    for block in unet.down_blocks:
        sizes.append((h, w))
        if getattr(block, "downsamplers", None) is not None:
            h, w = -(-h // 2), -(-w // 2)
    return sizes


@contextmanager
def capture(unet: nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Collect each level's skip feature of the UNet calls inside (the last call's, one tensor per level)."""
    features: list[torch.Tensor | None] = [None] * len(unet.down_blocks)

    def grab(level: int, last: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: tuple) -> None:
            features[level] = output[1][last]
        return hook

    handles = [block.register_forward_hook(grab(n, len(block.resnets) - 1)) for n, block in enumerate(unet.down_blocks)]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def pivot_features(unet: nn.Module, latents: torch.Tensor, inputs: dict[str, Any], do_cfg: bool) -> list[torch.Tensor]:
    """h_{n,0}^{r-1}: one frozen UNet pass on the clean pivot at t=0, in the CFG batch layout of ``inputs``.

    ``inputs`` are the UNet keyword arguments at the pivot's own size (SDXL micro-conditioning included).
    """
    model_input = torch.cat([latents] * 2) if do_cfg else latents
    t = torch.zeros((), dtype=torch.long, device=latents.device)
    with capture(unet) as features:
        unet(model_input, t, **inputs, return_dict=False)
    return list(features)


def _call_sample_and_timestep(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    return sample, timestep


def _feature_rows(sample: torch.Tensor) -> int:
    """Rows of the UNet's internal features for ``sample``: B, or B*F for a video [B, C, F, H, W]."""
    return sample.shape[0] * (sample.shape[2] if sample.ndim == 5 else 1)


def _time_embedding(unet: nn.Module, sample: torch.Tensor, timestep: Any, timestep_cond: Any) -> torch.Tensor:
    """The timestep embedding the UNet's resnets see, one row per feature row (repeated per frame for video)."""
    if hasattr(unet, "get_time_embed"):
        t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    else:  # UNet3DConditionModel computes it inline in forward: the same steps
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        t_emb = unet.time_proj(timesteps).to(unet.dtype)
    temb = unet.time_embedding(t_emb, timestep_cond)
    return temb.repeat_interleave(_feature_rows(sample) // sample.shape[0], dim=0)


@contextmanager
def inject(unet: nn.Module, bank: UpsamplerBank | nn.Module, features: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add ``bank``'s residuals of the pivot ``features`` at every UNet call inside (Eq. 9).

    ``bank`` may be wrapped (DistributedDataParallel): it is called as given, so gradients synchronise,
    and its config is read from ``bank.module``. ``features`` must have the batch layout of the calls
    (with CFG: [negative, positive], as ``pivot_features`` gives).
    """
    config_bank = getattr(bank, "module", bank)
    config_bank.check_compatible(unet)
    if len(features) != config_bank.num_levels or any(f is None for f in features):
        raise ValueError(f"expected {config_bank.num_levels} pivot features (one per level), got {len(features)}; "
                         "compute them with selfcascade.unet_features.pivot_features on the same UNet.")
    injection = config_bank.config.injection
    bank_dtype = next(config_bank.parameters()).dtype
    skip_at, num_entries = _skip_indices(unet)
    pending: list[torch.Tensor] = []

    def residuals_for_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sample, timestep = _call_sample_and_timestep(args, kwargs)
        if features[0].shape[0] != _feature_rows(sample):
            raise ValueError(
                f"pivot features have batch {features[0].shape[0]} but the UNet call has batch {_feature_rows(sample)} "
                "(frames included): compute them with the same classifier-free-guidance layout and frame count as "
                "the high-res pass."
            )
        temb = _time_embedding(unet, sample, timestep, kwargs.get("timestep_cond"))
        sizes = level_sizes(unet, *sample.shape[-2:])
        out = bank([f.to(bank_dtype) for f in features], temb.to(bank_dtype), sizes)
        out = [r.to(sample.dtype) for r in out]
        if injection == "hidden":
            pending[:] = out
            return args, kwargs
        zero = torch.zeros((), dtype=sample.dtype, device=sample.device)
        down: list[torch.Tensor] = [zero] * num_entries
        for index, residual in zip(skip_at, out):
            down[index] = residual
        given = kwargs.get("down_block_additional_residuals")
        if given is not None:  # a ControlNet's residuals as well: add ours to theirs
            down = [a + b for a, b in zip(given, down)]
        kwargs["down_block_additional_residuals"] = tuple(down)
        if kwargs.get("mid_block_additional_residual") is None:
            kwargs["mid_block_additional_residual"] = zero
        return args, kwargs

    def add_to_input(level: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (args[0] + pending[level], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + pending[level]}
        return hook

    def add_to_output(level: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: tuple) -> tuple:
            return (output[0] + pending[level], *output[1:])
        return hook

    handles = [unet.register_forward_pre_hook(residuals_for_call, with_kwargs=True)]
    if injection == "hidden":
        for n, block in enumerate(unet.down_blocks):
            if getattr(block, "downsamplers", None) is not None:
                handles.append(block.downsamplers[0].register_forward_pre_hook(add_to_input(n), with_kwargs=True))
            else:
                handles.append(block.register_forward_hook(add_to_output(n)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tuned_stage_context(unet: nn.Module, banks: Sequence[UpsamplerBank | None]) -> StageContext:
    """The sampler's per-stage hook for the tuned cascade: ``banks[r - 1]`` guides stage r (None: tuning-free)."""

    def context(stage: int, prev_latents: torch.Tensor, prev_inputs: dict, guidance: float) -> ContextManager:
        bank = banks[stage - 1]
        if bank is None:
            return nullcontext()
        features = pivot_features(unet, prev_latents, prev_inputs, do_cfg=guidance > 1.0)
        return inject(unet, bank, features)

    return context


__all__ = ["capture", "inject", "level_sizes", "pivot_features", "tuned_stage_context"]
