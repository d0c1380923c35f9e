"""selfcascade: higher-resolution generation from pretrained diffusion models (arXiv 2402.10491)."""

from .plan import ScalePlan, make_plan
from .pipeline import CascadeOutput, SelfCascadePipeline
from .upsamplers import TimeAwareFeatureUpsampler, UpsamplerBank

__all__ = ["CascadeOutput", "ScalePlan", "SelfCascadePipeline", "TimeAwareFeatureUpsampler", "UpsamplerBank", "make_plan"]
__version__ = "0.1.0"
