"""Loading what users have beside diffusers folders: single-file checkpoints, LoRA files, a replacement VAE, and
the UNet weights ``selfcascade finetune`` exports."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

#: Suffixes of single-file checkpoints (A1111/ComfyUI layout), loaded through diffusers' ``from_single_file``.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
#: A ``selfcascade finetune`` export: the whole UNet state, and what it was tuned from and how.
FINETUNE_WEIGHTS_FILE = "unet.safetensors"
FINETUNE_INFO_FILE = "finetune.json"


def is_single_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def load_single_file(path: str | Path, config: str | Path | None = None, dtype: torch.dtype | None = None,
                     **components: Any) -> Any:
    """A pipeline from one checkpoint file, via diffusers' ``from_single_file``.

    ``config``: a diffusers folder (or hub id) of the same architecture, whose component configs are used; a local
    folder keeps loading offline. Without it diffusers infers the model type and fetches its config from the hub.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionPipeline
    if config is not None and (Path(config) / "model_index.json").is_file():
        if json.loads((Path(config) / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL"):
            pipeline_class = StableDiffusionXLPipeline
    elif config is None:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

        if infer_diffusers_model_type(load_single_file_checkpoint(str(path))).startswith("xl"):
            pipeline_class = StableDiffusionXLPipeline
    kwargs = {"config": str(config), "local_files_only": Path(config).is_dir()} if config is not None else {}
    return pipeline_class.from_single_file(str(path), torch_dtype=dtype, **kwargs, **components)


def parse_lora(spec: str) -> tuple[str, float]:
    """'style.safetensors' -> (path, 1.0); 'style.safetensors:0.7' -> (path, 0.7)."""
    path, sep, scale = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0


def apply_lora(pipe: Any, spec: str, adapter_name: str = "lora") -> None:
    """Load a LoRA (a file or folder diffusers' ``load_lora_weights`` reads) at its scale (``FILE[:SCALE]``)."""
    path, scale = parse_lora(spec)
    if not Path(path).exists():
        raise FileNotFoundError(f"LoRA {path} not found: give a .safetensors file or a folder of LoRA weights.")
    source = Path(path)
    if source.is_file():
        pipe.load_lora_weights(str(source.parent), weight_name=source.name, adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(str(source), adapter_name=adapter_name)
    pipe.set_adapters([adapter_name], adapter_weights=[scale])


def load_unet_weights(unet: torch.nn.Module, folder: str | Path, base_model: str | None = None) -> dict:
    """Replace ``unet``'s weights by a ``selfcascade finetune`` export; returns its ``finetune.json``."""
    folder = Path(folder)
    weights = folder / FINETUNE_WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: --unet-weights takes a folder written by "
                                "`selfcascade finetune`.")
    info_file = folder / FINETUNE_INFO_FILE
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if base_model is not None and info.get("base_model") not in (None, base_model):
        logger.warning("%s was fine-tuned from %s, not %s", folder, info["base_model"], base_model)
    state, own = load_file(str(weights)), unet.state_dict()
    misfits = sorted(set(own) ^ set(state)) + [k for k in state if k in own and state[k].shape != own[k].shape]
    if misfits:
        raise ValueError(f"{weights} does not fit this UNet ({len(misfits)} missing, extra or differently shaped "
                         f"tensors, e.g. {misfits[:2]}): it was fine-tuned from "
                         f"{info.get('base_model', 'another model')}; pass that model with --model.")
    unet.load_state_dict(state)
    return info
