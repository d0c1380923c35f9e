"""Scale decomposition: split base -> target into stages of about 4x more pixels each.

Paper section 4.1: R = ceil(log4(d_R / d)) stages follow the base stage. Every stage keeps the
target's aspect ratio; stage 0 keeps roughly the base pixel count at that ratio, and the sizes in
between grow geometrically, each side rounded to a multiple the UNet accepts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Largest target/base pixel ratio accepted unless the caller raises it (4 stages past the base).
DEFAULT_MAX_RATIO = 256.0
#: Tolerance so that exact powers of four (e.g. 4.0000001 from float maths) do not add a stage.
_LOG_EPS = 1e-9


@dataclass(frozen=True)
class ScalePlan:
    """Stage sizes in pixels, base first, target last. Pure data: no model, no device."""

    base: tuple[int, int]
    target: tuple[int, int]
    multiple: int
    stages: tuple[tuple[int, int], ...]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def ratio(self) -> float:
        """Target pixels over base pixels."""
        return (self.target[0] * self.target[1]) / (self.base[0] * self.base[1])

    def __str__(self) -> str:
        bh, bw = self.base
        th, tw = self.target
        lines = [
            f"scale plan: base {bh}x{bw} -> target {th}x{tw} (HxW), {self.ratio:.2f}x pixels, "
            f"{self.num_stages} stage(s), sides multiple of {self.multiple}"
        ]
        prev = None
        for r, (h, w) in enumerate(self.stages):
            grow = "" if prev is None else f"  ({h * w / (prev[0] * prev[1]):.2f}x pixels)"
            kind = "from noise" if r == 0 else "from pivot"
            lines.append(f"  stage {r}: {h:>5} x {w:<5} {kind}{grow}")
            prev = (h, w)
        return "\n".join(lines)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def _nearest_valid(value: int, multiple: int) -> str:
    low = (value // multiple) * multiple
    high = low + multiple
    return f"{low} or {high}" if low >= multiple else f"{high}"


def make_plan(
    base: int | tuple[int, int],
    height: int,
    width: int,
    multiple: int = 8,
    max_ratio: float = DEFAULT_MAX_RATIO,
    single_stage: bool = False,
    single_jump: bool = False,
    final_multiple: int | None = None,
) -> ScalePlan:
    """Build the stage sizes for sampling ``height x width`` with a model trained at ``base``.

    ``multiple`` is what every intermediate side must divide by (``vae_scale_factor * 2**downsamplings``);
    ``final_multiple`` what the target's sides must divide by (default ``multiple``; diffusers' pipelines take
    any multiple of ``vae_scale_factor`` there, the UNet padding odd latent sizes).
    ``single_stage`` gives direct inference: one stage at the target size.
    ``single_jump`` keeps the base stage and jumps straight to the target (upscale then img2img, "hires fix").
    """
    base_hw = (base, base) if isinstance(base, int) else tuple(base)
    final_multiple = multiple if final_multiple is None else final_multiple
    for name, value in (("height", height), ("width", width), ("base height", base_hw[0]),
                        ("base width", base_hw[1]), ("multiple", multiple), ("final multiple", final_multiple)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    for name, value in (("height", height), ("width", width)):
        if value % final_multiple:
            raise ValueError(
                f"{name}={value} is not a multiple of {final_multiple}, which this model needs; "
                f"use {_nearest_valid(value, final_multiple)}."
            )
    base_pixels = base_hw[0] * base_hw[1]
    target_pixels = height * width
    ratio = target_pixels / base_pixels
    if ratio > max_ratio:
        raise ValueError(
            f"{height}x{width} is {ratio:.0f}x the base model's {base_hw[0]}x{base_hw[1]} pixels, above the "
            f"limit of {max_ratio:g}x that guards against runaway memory and time; pass max_ratio "
            f"(CLI: --max-ratio) to raise it."
        )
    if single_stage:
        return ScalePlan(base_hw, (height, width), multiple, ((height, width),))
    if ratio < 1.0:
        raise ValueError(
            f"target {height}x{width} has fewer pixels than the base size {base_hw[0]}x{base_hw[1]}; "
            f"there is nothing to cascade: sample it directly (mode='direct', CLI: --mode direct)."
        )

    num_cascade = max(0, math.ceil(math.log(ratio, 4) - _LOG_EPS))
    if single_jump:
        num_cascade = min(num_cascade, 1)
    aspect = width / height
    stages: list[tuple[int, int]] = []
    for r in range(num_cascade):
        # Pixels grow geometrically from the base count to the target count.
        pixels = base_pixels * ratio ** (r / num_cascade)
        h = math.sqrt(pixels / aspect)
        stages.append((_round_to(h, multiple), _round_to(h * aspect, multiple)))
    stages.append((height, width))
    return ScalePlan(base_hw, (height, width), multiple, tuple(stages))
