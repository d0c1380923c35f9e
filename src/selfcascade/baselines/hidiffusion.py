"""HiDiffusion (Zhang et al., ECCV 2024, "HiDiffusion: Unlocking higher-resolution creativity and efficiency in
pretrained diffusion models", arXiv 2311.17528) run through the real PyPI package, ``hidiffusion==0.1.10``.

``apply_hidiffusion(pipe)`` with the package's own defaults (RAU-Net and MSW-MSA both on; its switching
thresholds T1/T2 per model and size) patches the wrapped pipeline's UNet for one direct pass at the target
size; ``remove_hidiffusion`` undoes it on exit, and this module puts back what the package leaves behind
(the ``num_upsamplers`` it raises by 12 and the ``info``/``model``/step-counter attributes it sets on every
module), so the UNet is as it was.

The package recognises SD 1.5/2.1-base and SDXL by the set of their UNet's module names (any widths), and its
blocks read the number of sampling steps from ``pipe._num_timesteps``, which diffusers' own ``__call__``
sets; the harness calls the UNet directly, so it sets that attribute for the call. MSW-MSA draws each call's
window shift from torch's global CPU generator (``torch.rand(1)``); the call runs in a forked generator seeded
with the first image's seed, so a seed gives the same image and the caller's generator state is untouched.
"""

from __future__ import annotations

import importlib
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Where hidiffusion 0.1.10 imports ``MultiControlNetModel`` from, and where diffusers >= 0.30 keeps it.
_OLD_MULTICONTROLNET = "diffusers.pipelines.controlnet.multicontrolnet"
_NEW_MULTICONTROLNET = "diffusers.models.controlnets.multicontrolnet"


def _alias_moved_multicontrolnet() -> None:
    """Compatibility shim: let ``import diffusers.pipelines.controlnet.multicontrolnet`` find the moved module.

    hidiffusion 0.1.10 imports ``MultiControlNetModel`` from its pre-0.30 location, which no longer exists in
    diffusers 0.42, so the package fails to import. Registering the new module under the old name in
    ``sys.modules`` is the whole fix (the class itself is unchanged); it is a no-op where the old path exists.
    """
    try:
        importlib.import_module(_OLD_MULTICONTROLNET)
    except ModuleNotFoundError:
        sys.modules[_OLD_MULTICONTROLNET] = importlib.import_module(_NEW_MULTICONTROLNET)


def _import_hidiffusion() -> Any:
    _alias_moved_multicontrolnet()
    try:
        return importlib.import_module("hidiffusion")
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "mode='hidiffusion' runs the hidiffusion package, which is not installed: "
            "pip install --no-deps hidiffusion==0.1.10 (--no-deps keeps your torch build)."
        ) from error


@contextmanager
def hidiffusion_applied(pipe: Any, num_inference_steps: int, seed: int) -> Iterator[None]:
    """Patch ``pipe``'s UNet with HiDiffusion (package defaults) for ``num_inference_steps``-step sampling; its
    window shifts draw from torch's CPU generator, seeded with ``seed`` in a fork.

    Raises a ValueError naming the supported layouts if the package does not recognise the UNet.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "name_or_path"):
        raise ValueError("mode='hidiffusion' needs a diffusers Stable Diffusion 1.5/2.1 or SDXL pipeline; "
                         f"{type(pipe).__name__} is not one (the embedded model is not SD-shaped).")
    hidiffusion = _import_hidiffusion()
    own_attrs = {name: set(vars(m)) for name, m in unet.named_modules()}
    own_upsamplers = unet.num_upsamplers
    had_pipe_info = hasattr(pipe, "info")
    had_num_timesteps = hasattr(pipe, "_num_timesteps")
    own_num_timesteps = getattr(pipe, "_num_timesteps", None)
    unnamed = pipe.name_or_path is None
    try:
        if unnamed:  # a pipeline built in memory: the package tests substrings of its name, which fails on None
            pipe.register_to_config(_name_or_path="")
        try:
            hidiffusion.apply_hidiffusion(pipe)
        except Exception as error:  # the package raises a bare Exception for layouts it does not know
            raise ValueError(
                f"hidiffusion does not support this UNet ({error}); it recognises Stable Diffusion 1.5/2.1-base "
                "and SDXL by their UNet's module names. Use another mode for this model."
            ) from error
        pipe._num_timesteps = num_inference_steps
        logger.info("hidiffusion applied (RAU-Net + MSW-MSA, package defaults) for %d steps", num_inference_steps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        hidiffusion.remove_hidiffusion(pipe)
        if unnamed:
            pipe.register_to_config(_name_or_path=None)
        unet.num_upsamplers = own_upsamplers
        for name, module in unet.named_modules():
            for attr in set(vars(module)) - own_attrs.get(name, set()):
                delattr(module, attr)
        if not had_pipe_info and hasattr(pipe, "info"):
            del pipe.info
        if had_num_timesteps:
            pipe._num_timesteps = own_num_timesteps
        elif hasattr(pipe, "_num_timesteps"):
            del pipe._num_timesteps


def is_patched(unet: nn.Module) -> bool:
    """Whether any module of ``unet`` currently runs one of hidiffusion's patched classes."""
    return any(hasattr(type(m), "_parent") for m in unet.modules())
