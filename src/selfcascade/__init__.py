"""selfcascade: higher-resolution generation from pretrained diffusion models (arXiv 2402.10491)."""

import logging


def _drop_torchvision_fallback_notice(record: logging.LogRecord) -> bool:
    """diffusers' pipeline modules import transformers' image processors, which selfcascade never runs; without
    torchvision transformers announces a fallback for each, telling users to install a package they do not need."""
    return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_fallback_notice)

from .plan import ScalePlan, make_plan

__all__ = ["CascadeOutput", "ScalePlan", "SelfCascadePipeline", "TimeAwareFeatureUpsampler", "UpsamplerBank", "make_plan"]
__version__ = "0.1.0"

#: Names imported on first use (PEP 562): they import torch and diffusers, which ``selfcascade --help`` needs not.
_LAZY = {"CascadeOutput": ".pipeline", "SelfCascadePipeline": ".pipeline", "TimeAwareFeatureUpsampler": ".upsamplers",
         "UpsamplerBank": ".upsamplers"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
