"""Hires fix: upscale a base-size sample and run img2img at the target, what most users do today.

Sample at the base size, decode, upscale the image (antialiased bicubic), encode, diffuse it to
t = strength * T and denoise from there at the target size. That is the self-cascade's sampler with a
two-stage plan (base, then the target in one jump, ``make_plan(single_jump=True)``), a pixel-space pivot
and K = strength * T; the self-cascade instead grows ~4x pixels per stage and re-noises further (K = 700).

The second stage runs the scheduler's timesteps <= strength * T, as every later cascade stage does;
diffusers' img2img instead runs the last int(steps * strength) steps, which differs by at most one step.
"""

from __future__ import annotations

from ..cascade import PivotSpace, resolve_k

#: img2img denoising strength. 0.5-0.6 is the range commonly used for upscaling: lower keeps the blur of
#: the upscaled image, higher lets the model redraw the layout at the target size (and repeat objects).
DEFAULT_STRENGTH = 0.55
#: The jump decodes, resizes and encodes (pixel space), as the hires fix does with an image upscaler.
PIVOT_SPACE: PivotSpace = "pixel"


def strength_to_k(strength: float, num_train_timesteps: int) -> int:
    """K = strength * T, for a strength in (0, 1]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}.")
    return resolve_k(num_train_timesteps, noise_level=float(strength))
