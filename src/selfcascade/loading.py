"""Loading what users have beside diffusers folders: single-file checkpoints, LoRA files, a replacement VAE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: Suffixes of single-file checkpoints (A1111/ComfyUI layout), loaded through diffusers' ``from_single_file``.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


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
