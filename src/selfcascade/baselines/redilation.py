"""ScaleCrafter's re-dilation (He et al. 2023, "ScaleCrafter: Tuning-free higher-resolution visual
generation with diffusion models", arXiv 2310.07702): widen the UNet's receptive field to the new size.

At s times the training side, an object spans s times more latent cells, but a 3x3 convolution still
sees 3x3 of them; ScaleCrafter traces object repetition to this and dilates the convolutions by s
(padding likewise, so feature sizes do not change) while the layout forms, i.e. at high timesteps.

What this module does, and what it leaves out of ScaleCrafter:
- dilation = round(sqrt(target pixels / base pixels)), an integer; ScaleCrafter also handles fractional
  factors (the next integer dilation on a feature map resized to match), here they are rounded;
- one dilation for every re-dilated layer and step; ScaleCrafter's 16x settings use 2 to 4 depending on
  the layer and can lower the factor progressively over the steps;
- no dispersed convolution (ScaleCrafter's kernel transform for large factors) and no noise-damped
  classifier-free guidance.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

#: Resolution levels, highest resolution first, whose convolutions keep their trained dilation.
#: ScaleCrafter's SD 2.1 512 -> 1024^2 script (ScaleCrafter-ptl, ``--dilate_skip 4``) leaves conv_in and the
#: first level undilated and re-dilates the rest down, in the middle and up (it also spares the first
#: level's neighbour in the up path; here levels are whole diffusers blocks).
UNDILATED_LEVELS = 1
#: Re-dilate only while the timestep is above this fraction of T. The same script (``--dilate_tau 20``)
#: re-dilates the first 20 of 50 DDIM steps, timesteps 981..601 of 1000; later steps refine local
#: detail with the convolutions as trained.
REDILATE_ABOVE = 0.6


def redilation_factor(pixel_ratio: float) -> int:
    """The integer dilation for a target with ``pixel_ratio`` times the base pixels (1: none)."""
    return max(1, round(pixel_ratio**0.5))


def redilated_convs(unet: nn.Module, undilated_levels: int = UNDILATED_LEVELS) -> list[nn.Conv2d]:
    """The 3x3 convolutions of the down, mid and up blocks below the first ``undilated_levels`` levels.

    conv_in and conv_out are never included; 1x1 convolutions (shortcuts, projections) have nothing to dilate.
    """
    levels = len(unet.down_blocks)
    if not 0 <= undilated_levels <= levels:
        raise ValueError(f"undilated_levels must lie in [0, {levels}] for this {levels}-level UNet, "
                         f"got {undilated_levels}.")
    blocks = [*unet.down_blocks[undilated_levels:], unet.mid_block, *unet.up_blocks[:levels - undilated_levels]]
    return [
        m for block in blocks if block is not None for m in block.modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.dilation == (1, 1) and m.padding == (1, 1)
        and m.padding_mode == "zeros"
    ]


def _timestep(args: tuple, kwargs: dict) -> float:
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


@contextmanager
def redilated(
    unet: nn.Module,
    dilation: int,
    num_train_timesteps: int,
    undilated_levels: int = UNDILATED_LEVELS,
    above: float = REDILATE_ABOVE,
) -> Iterator[None]:
    """Run ``unet``'s deeper 3x3 convolutions dilated by ``dilation`` at timesteps > ``above`` * T.

    A forward pre-hook on the UNet switches the convolutions' dilation and padding for each call; on exit
    (also on error) the hook is removed and every convolution gets its own dilation and padding back.
    """
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive integer, got {dilation!r}.")
    if not 0.0 <= above <= 1.0:
        raise ValueError(f"above must lie in [0, 1] (a fraction of the training timesteps), got {above}.")
    convs = redilated_convs(unet, undilated_levels)
    trained = [(conv.dilation, conv.padding) for conv in convs]
    dilated = ((dilation, dilation), (dilation, dilation))
    threshold = above * num_train_timesteps

    def switch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        wide = _timestep(args, kwargs) > threshold
        for conv, own in zip(convs, trained):
            conv.dilation, conv.padding = dilated if wide else own

    handle = unet.register_forward_pre_hook(switch, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for conv, (own_dilation, own_padding) in zip(convs, trained):
            conv.dilation, conv.padding = own_dilation, own_padding
