"""The rendered emoji at one size, with cached caption embeddings, held in memory.

At 32-128 px the whole split fits in RAM as uint8 (12k images are 37 MB at 32 px, 600 MB at 128 px),
so training reads no files after start-up and batches are plain tensor indexing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from selfcascade.data.emoji import default_cache_dir, image_path, read_manifest
from selfcascade.text_encoder import DEFAULT_MAX_LENGTH, CaptionCache, TextEncoder

logger = logging.getLogger(__name__)


def caption_cache_path(cache_dir: Path, max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    return Path(cache_dir) / f"captions_minilm_l{max_length}.safetensors"


def check_images(cache_dir: Path, records: list[dict], size: int) -> None:
    """Raise, naming the command that renders them, if any of the records' renderings at ``size`` px is missing."""
    missing = [r["id"] for r in records if not image_path(cache_dir, size, r["id"]).exists()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) at {size} px are missing under {cache_dir}/images/{size} "
            f"(e.g. {missing[0]}); run `selfcascade data build --sizes {size}`"
        )


def load_images(cache_dir: Path, records: list[dict], size: int, split: str | None,
                progress: bool = True) -> torch.Tensor:
    """uint8 [N, 3, size, size] of the records' renderings, written into one preallocated tensor: the train split
    at 512 px is 9.6 GB, and stacking a list of arrays then permuting would hold it three times over."""
    check_images(cache_dir, records, size)
    out = torch.empty(len(records), 3, size, size, dtype=torch.uint8)
    for i, r in enumerate(tqdm(records, desc=f"loading {split or 'all'} {size} px", unit="img", mininterval=2,
                               disable=not progress)):
        out[i] = torch.from_numpy(np.array(Image.open(image_path(cache_dir, size, r["id"])).convert("RGB"))).permute(2, 0, 1)
    return out


class EmojiDataset(torch.utils.data.Dataset):
    """Images of one split at one size (uint8 [N, 3, S, S]) and their caption embeddings.

    ``__getitem__`` returns (image in [-1, 1], hidden [L, 384], mask [L]); ``batch`` does the same
    for a tensor of indices without Python-level loops.
    """

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        size: int = 32,
        split: str | None = "train",
        max_length: int = DEFAULT_MAX_LENGTH,
        encoder: TextEncoder | None = None,
    ) -> None:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        records = read_manifest(cache_dir)
        # One cache for every split, so loading train and eval does not re-encode either.
        all_captions = [r["caption"] for r in records]
        if split is not None:
            records = [r for r in records if r["split"] == split]
        if not records:
            raise ValueError(f"no {split!r} records in the manifest under {cache_dir}")
        self.records = records
        self.size = size
        self.cache_dir, self.split = cache_dir, split
        self.images = load_images(cache_dir, records, size, split)  # first: a missing image fails fast
        self.captions = CaptionCache.build(all_captions,
                                           caption_cache_path(cache_dir, max_length), encoder)
        self.zoom_images: dict[int, torch.Tensor] = {}
        self.caption_index = torch.tensor([self.captions.index[r["caption"]] for r in records])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, hidden, mask = self.batch(torch.tensor([i]))
        return image[0], hidden[0], mask[0]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images in [-1, 1] float32, caption hidden states float32, masks bool."""
        images = self.images[indices].float() / 127.5 - 1.0
        c = self.caption_index[indices]
        return images, self.captions.hidden[c].float(), self.captions.mask[c]

    def zoomed(self, indices: torch.Tensor, generator: torch.Generator, zoom: int = 2) -> torch.Tensor:
        """Random ``size``-px windows of the images rendered ``zoom`` times larger, in [-1, 1].

        Shows the base model parts of each emoji at ``zoom``x their usual scale, which is what a
        cascade's higher-resolution stages ask it to denoise (a model that only saw whole emoji
        filling the frame breaks an upsampled pivot into small copies).
        """
        if zoom not in self.zoom_images:
            self.zoom_images[zoom] = load_images(self.cache_dir, self.records, self.size * zoom, self.split)
        big = self.zoom_images[zoom][indices]
        span = big.shape[-1] - self.size + 1
        ys = torch.randint(0, span, (len(indices),), generator=generator).tolist()
        xs = torch.randint(0, span, (len(indices),), generator=generator).tolist()
        crops = [img[:, y:y + self.size, x:x + self.size] for img, y, x in zip(big, ys, xs)]
        return torch.stack(crops).float() / 127.5 - 1.0

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's (hidden [L, 384], mask [L]): the classifier-free-guidance context."""
        return self.captions.uncond_hidden.float(), self.captions.uncond_mask


class ClipDataset:
    """Clips of one size (uint8 [N, 3, F, S, S]) and their caption embeddings, for training a video model.

    ``batch`` mirrors ``EmojiDataset.batch``: clips in [-1, 1], hidden [B, L, 384], masks [B, L].
    """

    def __init__(self, clips: torch.Tensor, captions: list[str], cache_dir: Path | str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, encoder: TextEncoder | None = None) -> None:
        if clips.ndim != 5 or len(clips) != len(captions):
            raise ValueError(f"need clips [N, 3, F, S, S] and one caption each, got {tuple(clips.shape)} and "
                             f"{len(captions)} captions.")
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.clips = clips
        self.captions = CaptionCache.build(captions, cache_dir / f"captions_clips_minilm_l{max_length}.safetensors",
                                           encoder)
        self.caption_index = torch.tensor([self.captions.index[c] for c in captions])

    def __len__(self) -> int:
        return len(self.clips)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        clips = self.clips[indices].float() / 127.5 - 1.0
        c = self.caption_index[indices]
        return clips, self.captions.hidden[c].float(), self.captions.mask[c]

    def uncond(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.captions.uncond_hidden.float(), self.captions.uncond_mask
