"""Self-attention over windows of the token grid instead of the whole grid, as attention processors that wrap a
layer's own processor (no copy of diffusers' attention maths), installed and removed by context managers.

- ``windowed_self_attention``: HiDiffusion's MSW-MSA (Zhang et al. 2023, arXiv 2311.17528, Sec. 3.3): at the
  highest-resolution attention level, tokens attend within 2x2 windows of the feature map, the windows shifted
  by a quarter of the feature map on every other UNet call (Swin's shifted windows), so attention costs about a
  quarter and information still crosses window borders. The cascade's final stage grows ~4x pixels from its
  pivot, so each window holds about the token count the layer saw in the previous stage.
- ``scale_fused_self_attention``: FreeScale's scale fusion (Qiu et al. 2024, arXiv 2412.09626, Sec. 3.3):
  every self-attention layer computes global attention and local attention over overlapping tiles of the
  training size (stride half a tile, averaged), and keeps the local result's low frequencies and the global
  result's high frequencies, ``G(local) + global - G(global)``, G a Gaussian blur of kernel 2s-1, sigma 1 (s:
  the side ratio to the training size), as in the official code (``scale_attention.py``).

The token grid's size comes from a forward pre-hook on the UNet (the latent size of the current call) and each
layer's level (its block's index): diffusers flattens the feature map before attention.
"""

from __future__ import annotations

import contextlib
import math
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

GridFn = Callable[[], tuple[int, int]]


def _levels(unet: nn.Module) -> dict[nn.Module, int]:
    """The resolution level (0: full latent size) of every self-attention module of ``unet``."""
    names = {module: name for name, module in unet.named_modules()}
    levels = len(unet.down_blocks)
    out = {}
    attentions = [m for m in unet.modules() if hasattr(m, "set_processor") and not getattr(m, "is_cross_attention", True)]
    for module in attentions:
        name = names[module]
        if (m := re.match(r"down_blocks\.(\d+)\.", name)) is not None:
            out[module] = int(m.group(1))
        elif (m := re.match(r"up_blocks\.(\d+)\.", name)) is not None:
            out[module] = levels - 1 - int(m.group(1))
        else:
            out[module] = levels - 1
    return out


class _GridTracker:
    """Records the latent size of the UNet's current call."""

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        self.size = tuple(sample.shape[-2:])


def _grid(tracker: _GridTracker, factor: int, tokens: int) -> tuple[int, int]:
    if tracker.size is None:
        raise RuntimeError("windowed attention ran outside a UNet call; install it with its context manager.")
    h, w = math.ceil(tracker.size[0] / factor), math.ceil(tracker.size[1] / factor)
    if h * w != tokens:
        raise ValueError(f"cannot place {tokens} tokens on the {h}x{w} grid of this level; use sides that are "
                         "multiples of the model's size multiple.")
    return h, w


def _self_attention_input(hidden_states: torch.Tensor, encoder_hidden_states: Any, attn: Any) -> bool:
    return (encoder_hidden_states is None and hidden_states.ndim == 3 and attn.group_norm is None
            and attn.spatial_norm is None and not attn.residual_connection)


class ShiftedWindowProcessor:
    """MSW-MSA: the wrapped processor runs on 2x2 windows, shifted by a quarter grid on every other call."""

    def __init__(self, inner: Any, tracker: _GridTracker, factor: int) -> None:
        self.inner, self.tracker, self.factor = inner, tracker, factor
        self.calls = 0

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:
        if not _self_attention_input(hidden_states, encoder_hidden_states, attn) or attention_mask is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, tokens, channels = hidden_states.shape
        h, w = _grid(self.tracker, self.factor, tokens)
        if h % 2 or w % 2:
            return self.inner(attn, hidden_states, None, None, temb, **kwargs)
        shift = (h // 4, w // 4) if self.calls % 2 else (0, 0)
        self.calls += 1
        x = torch.roll(hidden_states.view(batch, h, w, channels), shifts=(-shift[0], -shift[1]), dims=(1, 2))
        windows = x.view(batch, 2, h // 2, 2, w // 2, channels).permute(0, 1, 3, 2, 4, 5)
        windows = windows.reshape(batch * 4, (h // 2) * (w // 2), channels)
        out = self.inner(attn, windows, None, None, temb, **kwargs)
        out = out.view(batch, 2, 2, h // 2, w // 2, -1).permute(0, 1, 3, 2, 4, 5).reshape(batch, h, w, -1)
        return torch.roll(out, shifts=shift, dims=(1, 2)).reshape(batch, tokens, -1)


def tile_starts(size: int, tile: int) -> list[int]:
    """Starts of tiles of ``tile`` cells with stride tile/2 covering ``size`` cells (the last one flush)."""
    if tile >= size:
        return [0]
    stride = max(1, tile // 2)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def gaussian_blur(x: torch.Tensor, kernel: int, sigma: float = 1.0) -> torch.Tensor:
    """Depthwise Gaussian blur of [B, C, H, W] (kernel 1: identity)."""
    if kernel <= 1:
        return x
    coords = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    g = g / g.sum()
    weight = (g[:, None] * g[None, :]).expand(x.shape[1], 1, kernel, kernel)
    return F.conv2d(F.pad(x, [kernel // 2] * 4, mode="replicate"), weight, groups=x.shape[1])


class ScaleFusionProcessor:
    """FreeScale: G(local attention over overlapping tiles) + global attention - G(global attention)."""

    def __init__(self, inner: Any, tracker: _GridTracker, factor: int, base_latent: tuple[int, int]) -> None:
        self.inner, self.tracker, self.factor = inner, tracker, factor
        self.base_latent = base_latent

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any = None,
                 attention_mask: Any = None, temb: Any = None, **kwargs: Any) -> torch.Tensor:
        out_global = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if not _self_attention_input(hidden_states, encoder_hidden_states, attn) or attention_mask is not None:
            return out_global
        batch, tokens, channels = hidden_states.shape
        h, w = _grid(self.tracker, self.factor, tokens)
        th, tw = (math.ceil(s / self.factor) for s in self.base_latent)
        if th >= h and tw >= w:
            return out_global
        x = hidden_states.view(batch, h, w, channels)
        total = torch.zeros(batch, h, w, out_global.shape[-1], dtype=out_global.dtype, device=out_global.device)
        count = torch.zeros(1, h, w, 1, dtype=out_global.dtype, device=out_global.device)
        for top in tile_starts(h, th):
            for left in tile_starts(w, tw):
                tile = x[:, top:top + th, left:left + tw].reshape(batch, -1, channels)
                out = self.inner(attn, tile, None, None, temb, **kwargs)
                total[:, top:top + th, left:left + tw] += out.view(batch, min(th, h), min(tw, w), -1)
                count[:, top:top + th, left:left + tw] += 1
        local = (total / count).permute(0, 3, 1, 2)
        glob = out_global.view(batch, h, w, -1).permute(0, 3, 1, 2)
        kernel = 2 * max(1, round(max(h / th, w / tw))) - 1
        fused = gaussian_blur(local, kernel) + glob - gaussian_blur(glob, kernel)
        return fused.permute(0, 2, 3, 1).reshape(batch, tokens, -1)


@contextmanager
def _installed(unet: nn.Module, make: Callable[[Any, _GridTracker, int], Any],
               only_top_level: bool) -> Iterator[list[Any]]:
    levels = _levels(unet)
    if not levels:
        raise ValueError(f"{type(unet).__name__} has no self-attention layers to window.")
    top = min(levels.values())
    chosen = {m: lvl for m, lvl in levels.items() if lvl == top or not only_top_level}
    tracker = _GridTracker()
    originals = {m: m.processor for m in chosen}
    handle = unet.register_forward_pre_hook(tracker, with_kwargs=True)
    processors = []
    try:
        for module, level in chosen.items():
            processor = make(module.processor, tracker, 2**level)
            module.set_processor(processor)
            processors.append(processor)
        yield processors
    finally:
        handle.remove()
        for module, original in originals.items():
            module.set_processor(original)


@contextmanager
def windowed_self_attention(unet: nn.Module) -> Iterator[list[ShiftedWindowProcessor]]:
    """MSW-MSA on the self-attention layers of ``unet``'s highest-resolution attention level (HiDiffusion's
    choice: there attention costs most). Yields the installed processors; the layers' own are put back on exit."""
    with _installed(unet, ShiftedWindowProcessor, only_top_level=True) as processors:
        yield processors


@contextmanager
def scale_fused_self_attention(unet: nn.Module, base_latent: tuple[int, int]) -> Iterator[list[ScaleFusionProcessor]]:
    """FreeScale's scale fusion on every self-attention layer; tiles are ``base_latent`` (training latent size)
    at level 0 and shrink with each level. The layers' own processors are put back on exit."""
    def make(inner: Any, tracker: _GridTracker, factor: int) -> ScaleFusionProcessor:
        return ScaleFusionProcessor(inner, tracker, factor, base_latent)

    with _installed(unet, make, only_top_level=False) as processors:
        yield processors


def windowed_final_stage(unet: nn.Module, num_stages: int, inner: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A cascade ``stage_context`` that adds ``windowed_self_attention`` to the last stage (around ``inner``'s
    context, e.g. tuned mode's bank, which every stage r >= 1 keeps)."""

    @contextmanager
    def context(stage: int, prev_latents: torch.Tensor, prev_inputs: dict, guidance: float) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if inner is not None:
                stack.enter_context(inner(stage, prev_latents, prev_inputs, guidance))
            if stage == num_stages - 1:
                stack.enter_context(windowed_self_attention(unet))
            yield

    return context
