"""Deep Shrink (Kohya, "Kohya Deep Shrink"; ComfyUI core node ``PatchModelAddDownscale``): direct inference at
the target size with the UNet's deeper levels run at half the resolution during the early, layout-forming steps.

The deep levels then see about as many tokens as in training and lay out one subject instead of repeating it;
later steps run the UNet as trained to draw detail at the full size. Settings are the node's defaults:
``block_number=3`` (ComfyUI's input block 3 of SD 1.5/SDXL is the first level's downsampler, so everything from
the second level down is shrunk: ``down_blocks[1:]``, the mid block and the matching up blocks in diffusers),
``downscale_factor=2``, ``start_percent=0``, ``end_percent=0.35`` (the first 35% of the schedule, timesteps
above 0.65 T), ``downscale_after_skip=True`` (the first level's skip keeps its full size), bicubic both ways.

How it maps onto diffusers without a UNet fork: a forward pre-hook on ``down_blocks[1]`` shrinks its input;
a pre-hook on the up block that consumes the full-size skip (``up_blocks[-2]``) upsamples its input and its
smaller skips to that skip's size. ComfyUI upsamples only right before the concatenation that mismatches, one
resnet later inside that block; here the whole up block runs at the full size (a block-level approximation).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

#: The diffusers down block whose input is shrunk (ComfyUI block_number=3 on SD 1.5/SDXL).
SHRUNK_DOWN_BLOCK = 1
#: Shrink while the timestep is above this fraction of T (ComfyUI end_percent=0.35).
SHRINK_ABOVE = 0.65
DOWNSCALE_FACTOR = 2


def _timestep(args: tuple, kwargs: dict[str, Any]) -> float:
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


@contextmanager
def deep_shrink(
    unet: nn.Module,
    num_train_timesteps: int,
    block: int = SHRUNK_DOWN_BLOCK,
    factor: int = DOWNSCALE_FACTOR,
    above: float = SHRINK_ABOVE,
) -> Iterator[dict[str, int]]:
    """Run ``unet``'s levels from ``down_blocks[block]`` down at 1/``factor`` the size while t > ``above`` * T.

    Yields a counter of the UNet calls that were shrunk (``"shrunk"``) and run as trained (``"full"``). All
    hooks are removed on exit, also on error; no weight or attribute of the UNet changes.
    """
    levels = len(unet.down_blocks)
    if not 1 <= block < levels:
        raise ValueError(f"block must lie in [1, {levels - 1}] for this {levels}-level UNet, got {block}: "
                         "block 0 is the full-resolution level, which Deep Shrink never shrinks.")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 2:
        raise ValueError(f"factor must be an integer >= 2, got {factor!r}.")
    threshold = above * num_train_timesteps
    counts = {"shrunk": 0, "full": 0}
    active = [False]

    def decide(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        active[0] = _timestep(args, kwargs) > threshold
        counts["shrunk" if active[0] else "full"] += 1

    def shrink(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not active[0]:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        h, w = hidden.shape[-2:]
        deeper = 2 ** sum(getattr(b, "downsamplers", None) is not None for b in unet.down_blocks[block:])
        if h % (factor * deeper) or w % (factor * deeper):
            raise ValueError(f"deep-shrink cannot halve a {h}x{w} feature map that still has {deeper}x of downsampling "
                             f"below it; use a target whose sides are multiples of {factor}x the model's size multiple.")
        small = F.interpolate(hidden, size=(h // factor, w // factor), mode="bicubic", align_corners=False)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": small}
        return (small, *args[1:]), kwargs

    def grow(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        if not active[0]:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        skips = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
        size = max((s.shape[-2:] for s in skips), key=lambda hw: hw[0] * hw[1])

        def resize(x: torch.Tensor) -> torch.Tensor:
            return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bicubic", align_corners=False)

        hidden, skips = resize(hidden), tuple(resize(s) for s in skips)
        kwargs = dict(kwargs)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hidden
        else:
            args = (hidden, *args[1:])
        if "res_hidden_states_tuple" in kwargs:
            kwargs["res_hidden_states_tuple"] = skips
        else:
            args = (args[0], skips, *args[2:])
        return args, kwargs

    handles = [
        unet.register_forward_pre_hook(decide, with_kwargs=True),
        unet.down_blocks[block].register_forward_pre_hook(shrink, with_kwargs=True),
        unet.up_blocks[levels - 1 - block].register_forward_pre_hook(grow, with_kwargs=True),
    ]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
