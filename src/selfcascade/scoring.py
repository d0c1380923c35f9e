"""Score image sets batch by batch: the numbers of one row of `selfcascade evaluate`'s table.

Why batches: a set of 10k images at 2048 px is ~500 GB as float32, but what the metrics need from it is small. A
set is read once, a batch at a time, into a :class:`SetSummary`: features of the images (FID/KID), of random
base-size crops (pFID/pKID), of the images downsampled to the base size (FID_b/KID_b), SWD descriptors and style
hits; a row then compares two summaries. Memory: one batch of images, plus per image its feature vectors (one per
view and crop), SWD's descriptors (75 KB per pyramid level) and, when asked, its count of separate objects
(:mod:`selfcascade.metrics.objects`). Crop and descriptor positions depend on the seed
and the image's index only, so the numbers do not depend on the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .image_sets import ImageSet, as_image_set
from .metrics import (SWDDescriptors, frechet_distance, kernel_inception_distance, random_crops, resize_images,
                      sliced_wasserstein_from_descriptors)
from .metrics.features import FeatureExtractor
from .metrics.objects import count_objects as _count_objects

#: Images read and scored at a time by default: ~800 MB of float32 pixels at 2048 px.
DEFAULT_BATCH_SIZE = 16


@dataclass
class SetSummary:
    """What the table's metrics need from one image set; the optional parts are None where not asked for."""

    count: int
    features: torch.Tensor
    crop_features: torch.Tensor | None
    base_features: torch.Tensor | None
    swd: SWDDescriptors | None
    style_matches: int | None  # images the style head assigns their caption's style; None: not measurable
    objects: list[int] | None = None  # separate foreground objects per image; None: not counted

    @property
    def style_share(self) -> float | None:
        return None if self.style_matches is None else self.style_matches / self.count

    @property
    def mean_objects(self) -> float | None:
        return None if self.objects is None else sum(self.objects) / self.count

    @property
    def multi_object_share(self) -> float | None:
        """The share of images with more than one object: repetition."""
        return None if self.objects is None else sum(n > 1 for n in self.objects) / self.count


class _Accumulator:
    """The parts of a :class:`SetSummary`, one batch at a time."""

    def __init__(self, extractor: FeatureExtractor, crop_size: int | None, crops_per_image: int, crop_seed: int,
                 downsample_to: int | None, swd_seed: int | None, captions: list[str] | None,
                 count_objects: bool = False) -> None:
        self.extractor, self.captions = extractor, captions
        self.crop_size, self.crops_per_image, self.crop_seed = crop_size, crops_per_image, crop_seed
        self.downsample_to = downsample_to
        self.features: list[torch.Tensor] = []
        self.crop_features: list[torch.Tensor] = []
        self.base_features: list[torch.Tensor] = []
        self.swd = SWDDescriptors(seed=swd_seed) if swd_seed is not None else None
        self.style_matches: int | None = 0 if captions is not None and hasattr(extractor, "style_matches") else None
        self.objects: list[int] | None = [] if count_objects else None

    def add(self, images: torch.Tensor, first: int) -> None:
        """Images ``first``, ``first`` + 1, ... of the set; nothing here keeps a reference to them."""
        self.features.append(self.extractor(images))
        if self.crop_size is not None:
            crops = random_crops(images, self.crop_size, self.crops_per_image, self.crop_seed, first_index=first)
            self.crop_features.append(self.extractor(crops))
        if self.downsample_to is not None:
            self.base_features.append(self.extractor(resize_images(images, self.downsample_to)))
        if self.swd is not None:
            self.swd.add(images, first)
        if self.style_matches is not None:
            matches = self.extractor.style_matches(images, self.captions[first:first + images.shape[0]])
            self.style_matches = None if matches is None else self.style_matches + int(matches.sum())
        if self.objects is not None:
            self.objects += _count_objects(images)

    def summary(self, count: int) -> SetSummary:
        def cat(chunks: list[torch.Tensor]) -> torch.Tensor | None:
            return torch.cat(chunks) if chunks else None

        return SetSummary(count, torch.cat(self.features), cat(self.crop_features), cat(self.base_features), self.swd,
                          self.style_matches, self.objects)


def summarise(extractor: FeatureExtractor, images: ImageSet | torch.Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE,
              crop_size: int | None = None, crops_per_image: int = 4, crop_seed: int = 0,
              downsample_to: int | None = None, swd_seed: int | None = None,
              captions: list[str] | None = None, count_objects: bool = False) -> SetSummary:
    """Read ``images`` ``batch_size`` at a time into a :class:`SetSummary`: always features; crop features with
    ``crop_size``; features after downsampling with ``downsample_to``; SWD descriptors with ``swd_seed``; style
    hits with ``captions`` (one per image) and an extractor that knows styles; objects per image with
    ``count_objects`` (images on a plain background only, see :mod:`selfcascade.metrics.objects`)."""
    images = as_image_set(images)
    if images.count == 0:
        raise ValueError("no images to score")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if captions is not None and len(captions) != images.count:
        captions = None  # style adherence needs a caption per image
    accumulator = _Accumulator(extractor, crop_size, crops_per_image, crop_seed, downsample_to, swd_seed, captions,
                               count_objects)
    for start in range(0, images.count, batch_size):
        accumulator.add(images.read(start, min(start + batch_size, images.count)), start)  # freed before the next read
    return accumulator.summary(images.count)


def make_reference(extractor: FeatureExtractor, real: ImageSet | torch.Tensor, base: int, crops_per_image: int,
                   seed: int, batch_size: int = DEFAULT_BATCH_SIZE, count_objects: bool = False) -> SetSummary:
    """The real images at one target size, summarised once for every mode's row."""
    return summarise(extractor, real, batch_size=batch_size, crop_size=base, crops_per_image=crops_per_image,
                     crop_seed=seed, swd_seed=seed, count_objects=count_objects)


def _fid_kid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> tuple[float, float, float]:
    """FID, KID mean, KID std."""
    kid, kid_std = kernel_inception_distance(feats_a, feats_b)
    return frechet_distance(feats_a, feats_b), kid, kid_std


def score(extractor: FeatureExtractor, fake: ImageSet | torch.Tensor, reference: SetSummary,
          base_features: torch.Tensor | None, base: int, crops_per_image: int, seed: int,
          captions: list[str] | None = None, batch_size: int = DEFAULT_BATCH_SIZE, count_objects: bool = False) -> dict:
    """One table row's numbers and their sample counts (FID_b/KID_b are None without base samples; style
    adherence is None without the captions or an extractor that knows styles). ``count_objects`` adds the mean
    objects per image and the share with more than one, of ``fake`` and of ``reference`` (None unless
    :func:`make_reference` counted them too): images on a plain background only."""
    summary = summarise(extractor, fake, batch_size=batch_size, crop_size=base, crops_per_image=crops_per_image,
                        crop_seed=seed + 1,  # other positions than the real crops'
                        downsample_to=base if base_features is not None else None, swd_seed=seed, captions=captions,
                        count_objects=count_objects)
    row: dict = {"n_gen": summary.count, "n_real": reference.count}
    row["FID_r"], row["KID_r"], row["KID_r_std"] = _fid_kid(summary.features, reference.features)
    row["n_gen_crops"], row["n_real_crops"] = summary.crop_features.shape[0], reference.crop_features.shape[0]
    row["pFID_r"], row["pKID_r"], row["pKID_r_std"] = _fid_kid(summary.crop_features, reference.crop_features)
    row["n_base"] = 0 if base_features is None else base_features.shape[0]
    row["FID_b"] = row["KID_b"] = row["KID_b_std"] = None
    if base_features is not None:
        row["FID_b"], row["KID_b"], row["KID_b_std"] = _fid_kid(summary.base_features, base_features)
    row["SWD_x1e3"] = 1e3 * sliced_wasserstein_from_descriptors(summary.swd, reference.swd, seed=seed + 1).mean
    row["style_acc"] = summary.style_share
    if count_objects:
        row["objects"], row["objects_gt1"] = summary.mean_objects, summary.multi_object_share
        row["objects_real"], row["objects_gt1_real"] = reference.mean_objects, reference.multi_object_share
    return row


def style_adherence(extractor: FeatureExtractor, images: ImageSet | torch.Tensor, captions: list[str],
                    batch_size: int = DEFAULT_BATCH_SIZE) -> float | None:
    """The extractor's style adherence of ``images`` to ``captions``; None for features that know no styles."""
    return summarise(extractor, images, batch_size=batch_size, captions=captions).style_share
