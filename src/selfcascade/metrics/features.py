"""Feature extractors that turn images into the vectors FID and KID compare.

The paper measures FID/KID with clean-fid's Inception-V3 (TensorFlow weights). :class:`InceptionFeatures`
uses the same network as ported by torch-fidelity, through torchmetrics. Those weights are
downloaded on first use, which an offline machine cannot do, so construction fails loudly with
the fix instead of silently computing something else. There is deliberately no pixel-space
fallback: an "FID" on raw pixels is not comparable to any published number. The offline alternative
is the project's own network (:mod:`.emoji_features`, the penultimate layer of a classifier trained on
the emoji data set); :func:`load_features` picks between the two. Other networks plug in by
implementing :class:`FeatureExtractor`; name them so results say which features they used.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from .images import check_images, resize_images

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "selfcascade[eval]" (installs torchmetrics and torch-fidelity)'


class FeatureExtractorUnavailable(RuntimeError):
    """The feature extractor cannot be built here (missing package or weights); the message says how to fix it."""


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps float images ``[N, 3, H, W]`` in [0, 1] to features ``[N, D]``.

    ``name`` identifies the features in reports; ``input_size`` is the square side images are
    resized to before the network (None if used as given).
    """

    name: str
    input_size: int | None

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def _inception_class_and_cached_weights() -> tuple[type[torch.nn.Module], Path]:
    """torchmetrics' Inception wrapper, and where torch-fidelity's download lands in torch.hub's cache."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3, Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


class InceptionFeatures:
    """2048-d pool features of the TF-ported Inception-V3 (torch-fidelity weights, as torchmetrics uses).

    Preprocessing follows clean-fid's "clean" mode as closely as torch allows: antialiased bicubic
    resize to 299 px, then 8-bit quantisation (torch-fidelity's network takes uint8), so values are
    close to, not bit-identical with, clean-fid's.

    Weights come from ``weights_path``, else from torch.hub's cache. With ``allow_download=False``
    (the default) a missing file raises :class:`FeatureExtractorUnavailable` before any network
    access, so an offline run fails at once instead of waiting on a connection.
    """

    name = "inception-v3-pool-2048-torch-fidelity"
    input_size = 299

    def __init__(self, weights_path: str | Path | None = None, allow_download: bool = False,
                 device: str | torch.device = "cpu", batch_size: int = 50) -> None:
        try:
            network_class, cached = _inception_class_and_cached_weights()
        except ImportError as exc:
            raise FeatureExtractorUnavailable(
                f"Inception features need torchmetrics and torch-fidelity, which are not importable ({exc}). "
                f"Fix: {INSTALL_HINT}.") from exc
        path = Path(weights_path) if weights_path is not None else cached
        download = weights_path is None and allow_download and not path.is_file()
        if not path.is_file() and not download:
            raise FeatureExtractorUnavailable(
                f"Inception weights not found at {path}. Fix: on a machine with internet access, run "
                f"InceptionFeatures(allow_download=True) once (torch-fidelity caches the file there), then copy "
                f"that file to this machine's {cached} or pass weights_path=.")
        try:
            network = network_class(name="inception-v3-compat", features_list=["2048"],
                                    feature_extractor_weights_path=None if download else str(path))
        except Exception as exc:  # download errors, unreadable or mismatched weight files, API changes
            raise FeatureExtractorUnavailable(
                f"could not build the Inception feature extractor from {'the download' if download else path} "
                f"({type(exc).__name__}: {exc}). Fix: check the weight file (torch-fidelity's "
                f"{cached.name}) and that torchmetrics/torch-fidelity are compatible: {INSTALL_HINT}.") from exc
        self.network = network.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        features = []
        for start in range(0, images.shape[0], self.batch_size):
            batch = resize_images(images[start:start + self.batch_size].float(), self.input_size)
            batch = (batch * 255).round().to(torch.uint8).to(self.device)
            out = self.network(batch)
            # torchmetrics versions differ: some return torch-fidelity's tuple of feature tensors.
            out = out[0] if isinstance(out, tuple) else out
            features.append(out.reshape(batch.shape[0], -1).float().cpu())
        return torch.cat(features)


FEATURE_KINDS = ("auto", "inception", "emoji")


def load_features(kind: str = "auto", weights: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FeatureExtractor:
    """The extractor FID/KID should use: ``inception``, ``emoji`` (the project's offline network,
    :class:`~selfcascade.metrics.emoji_features.EmojiFeatures`), or ``auto``: Inception when
    torchmetrics, torch-fidelity and the weights are available here, else emoji.

    ``weights``: Inception's weight file or the emoji network's folder (default: torch.hub's cache,
    the shipped folder); under ``auto`` a folder means emoji and a file Inception.
    """
    from .emoji_features import EmojiFeatures

    if kind not in FEATURE_KINDS:
        raise ValueError(f"features must be one of {', '.join(FEATURE_KINDS)}, got {kind!r}")
    if kind == "emoji" or (kind == "auto" and weights is not None and Path(weights).is_dir()):
        return EmojiFeatures(weights, device=device)
    try:
        return InceptionFeatures(weights, device=device)
    except FeatureExtractorUnavailable as exc:
        if kind == "inception":
            raise
        logger.info("Inception features unavailable (%s); using the shipped emoji feature extractor", exc)
        return EmojiFeatures(device=device)
