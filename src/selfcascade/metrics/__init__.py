"""Evaluation metrics for the paper's Tables 1-2: FID/KID (full, patch, base), sliced Wasserstein.

Pure functions on feature arrays or image tensors, beside feature-extractor classes:

- :func:`frechet_distance`, :func:`kernel_inception_distance` on ``[N, D]`` features;
- :func:`sliced_wasserstein_distance` on images, no network needed (:class:`SWDDescriptors` and
  :func:`sliced_wasserstein_from_descriptors` for sets streamed batch by batch);
- :func:`resize_images`, :func:`random_crops` to build the FID_b and pFID image sets;
- :func:`temporal_consistency` (warping error under the known motion, frame difference) for clips, and
  :func:`motion_words` (which motion a clip shows, in the motion clips' caption words);
- :class:`FeatureExtractor`, :class:`InceptionFeatures`, :class:`EmojiFeatures` (the offline network the
  project trains) and :func:`load_features` (picks one) to get features from images.
"""

from .distances import (feature_statistics, frechet_distance, frechet_distance_from_stats,
                        kernel_inception_distance)
from .emoji_features import EmojiFeatures
from .features import FEATURE_KINDS, FeatureExtractor, FeatureExtractorUnavailable, InceptionFeatures, load_features
from .images import item_rng, random_crops, resize_images
from .motion import motion_words
from .swd import (SlicedWasserstein, SWDDescriptors, laplacian_pyramid, sliced_wasserstein_distance,
                  sliced_wasserstein_from_descriptors)
from .temporal import frame_difference, temporal_consistency, warping_error

__all__ = [
    "FEATURE_KINDS", "EmojiFeatures", "FeatureExtractor", "FeatureExtractorUnavailable", "InceptionFeatures",
    "SWDDescriptors", "SlicedWasserstein", "feature_statistics", "frechet_distance", "frechet_distance_from_stats",
    "frame_difference", "item_rng", "kernel_inception_distance", "laplacian_pyramid", "load_features", "motion_words",
    "random_crops", "resize_images",
    "sliced_wasserstein_distance", "sliced_wasserstein_from_descriptors", "temporal_consistency", "warping_error",
]
