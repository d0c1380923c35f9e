"""The methods users pick instead of the self-cascade, as modes of the same run (design.md section 4b):

- ``hidiffusion``: the PyPI package on the wrapped pipeline, one direct pass (``hidiffusion``);
- ``demofusion``: progressive upscaling with skip residuals, dilated sampling, patches (``demofusion``);
- ``freescale``: self-cascade upscaling, restrained dilation, scale fusion (``freescale``);
- ``deep-shrink``: Kohya's early-step downscale of a deep block, one direct pass (``deep_shrink``).

``SelfCascadePipeline.__call__`` asks this module for a mode's plan, the context around the sampling and the
sampler; modes not listed here get ``None``/no context, i.e. the cascade's own.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

from ..modes import RIVAL_MODES
from ..plan import ScalePlan
from .deep_shrink import deep_shrink
from .demofusion import demofusion_plan, sample_demofusion
from .freescale import sample_freescale
from .hidiffusion import hidiffusion_applied

#: Rivals that sample the target in one pass, from noise.
SINGLE_STAGE_RIVALS = frozenset({"hidiffusion", "deep-shrink"})
#: Rivals whose stages r >= 1 always run the whole schedule (so K does not apply).
FULL_SCHEDULE_RIVALS = frozenset({"demofusion"})
#: Pivot spaces other than the cascade's latent default (FreeScale resizes decoded images).
RIVAL_PIVOT_SPACE = {"freescale": "pixel"}


def rival_plan(mode: str, base: tuple[int, int], height: int, width: int, multiple: int) -> ScalePlan | None:
    """A rival's own stage sizes (DemoFusion: 1, 2, ..., s times the base side); None: the cascade's plan."""
    return demofusion_plan(base, height, width, multiple) if mode == "demofusion" else None


def rival_context(mode: str, backbone: Any, num_inference_steps: int, seed: int) -> ContextManager:
    """What a one-pass rival changes in the UNet for the call (nothing for the other modes); ``seed`` seeds
    hidiffusion's own random draws."""
    if mode == "hidiffusion":
        pipe = getattr(backbone, "pipe", None)
        if pipe is None:
            raise ValueError(f"mode='hidiffusion' patches a diffusers pipeline; {backbone.name} is not one "
                             "(use an SD 1.5/2.1 or SDXL pipeline).")
        return hidiffusion_applied(pipe, num_inference_steps, seed)
    if mode == "deep-shrink":
        return deep_shrink(backbone.unet, backbone.scheduler.config.num_train_timesteps)
    return nullcontext()


def rival_sampler(mode: str) -> Callable[..., Any] | None:
    """A rival's own sampler, with ``sample_cascade``'s arguments; None: ``sample_cascade``."""
    return {"demofusion": sample_demofusion, "freescale": sample_freescale}.get(mode)
