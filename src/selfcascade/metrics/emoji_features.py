"""The offline feature extractor: a small CNN the project trains on its own emoji data set.

Why it exists: FID/KID need a pretrained network, the paper's Inception-V3 weights cannot be fetched on
an offline machine, and distances on raw pixels mean little. This network is trained (see
:mod:`selfcascade.metrics.train_features`) to name the concept and the style of emoji renders from
random crops at scales from the whole image down to a quarter of its side, so its penultimate layer
describes shapes and styles at every scale the evaluation looks at: whole images (FID_r), base-size
crops of larger images (pFID_r) and base-size images (FID_b). Its numbers are comparable only with numbers from the same weights (the extractor's
``name`` carries a hash of them), never with published Inception FIDs.

Stored as ``config.json`` plus ``model.safetensors`` (fp16) in a folder; the shipped weights are in
``selfcascade/metrics/emoji_features/`` with a model card.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..io import atomic_path
from .images import check_images, resize_images

#: Where the trained weights ship inside the package.
DEFAULT_DIR = Path(__file__).with_name("emoji_features")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class EmojiFeatureNet(nn.Module):
    """VGG-style CNN: a stride-2 stem, then per width two 3x3 convolutions (the first strides by 2
    after the first stage), global average pooling to ``widths[-1]`` features, and two linear heads
    (concept, style) used only in training.

    At the 64 px input and the default widths it costs ~55 MMAC per image, so it trains on one CPU
    thread in minutes and scores a thousand images in a few seconds.
    """

    def __init__(self, num_concepts: int, num_styles: int, widths: tuple[int, ...] = (32, 64, 128, 256),
                 input_size: int = 64) -> None:
        super().__init__()
        self.config = {"num_concepts": num_concepts, "num_styles": num_styles, "widths": list(widths),
                       "input_size": input_size}
        layers = [_conv_bn_relu(3, widths[0], stride=2)]
        c_in = widths[0]
        for i, width in enumerate(widths):
            layers += [_conv_bn_relu(c_in, width, stride=1 if i == 0 else 2), _conv_bn_relu(width, width, stride=1)]
            c_in = width
        self.body = nn.Sequential(*layers)
        self.concept_head = nn.Linear(c_in, num_concepts)
        self.style_head = nn.Linear(c_in, num_styles)

    @property
    def feature_dim(self) -> int:
        return self.config["widths"][-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, S, S]`` in [0, 1] at the input size -> ``[N, feature_dim]`` (non-negative, pooled)."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features, concept logits, style logits."""
        feats = self.features(images)
        return feats, self.concept_head(feats), self.style_head(feats)


def save_feature_net(net: EmojiFeatureNet, folder: str | os.PathLike, labels: dict[str, list[str]],
                     info: dict) -> Path:
    """Write ``config.json`` (architecture, label names, training ``info``) and fp16 safetensors.

    Each file is replaced atomically, so other files in ``folder`` (the model card) stay.
    """
    folder = Path(folder)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp))
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps({**net.config, **labels, "training": info}, indent=1) + "\n")
    return folder


def load_feature_net(folder: str | os.PathLike | None = None) -> tuple[EmojiFeatureNet, dict]:
    """The network (fp32, eval mode) and its full config from a folder written by :func:`save_feature_net`."""
    folder = Path(folder) if folder is not None else DEFAULT_DIR
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"no emoji feature extractor in {folder} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            "`python -m selfcascade.metrics.train_features`, or reinstall selfcascade to get the shipped weights")
    config = json.loads((folder / CONFIG_FILE).read_text())
    net = EmojiFeatureNet(config["num_concepts"], config["num_styles"], tuple(config["widths"]), config["input_size"])
    net.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in load_file(str(folder / WEIGHTS_FILE)).items()})
    return net.eval(), config


class EmojiFeatures:
    """:class:`~selfcascade.metrics.features.FeatureExtractor` over a trained :class:`EmojiFeatureNet`.

    Images are resized (antialiased bicubic) to the network's input size, as Inception resizes to 299.
    ``name`` ends with the first 8 hex digits of the weights' SHA-256, so reports say exactly which
    weights made their numbers.
    """

    def __init__(self, folder: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 256) -> None:
        folder = Path(folder) if folder is not None else DEFAULT_DIR
        net, self.config = load_feature_net(folder)
        digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:8]
        self.name = f"selfcascade-emoji-cnn-{net.feature_dim}-{digest}"
        self.input_size: int | None = net.config["input_size"]
        self.device = torch.device(device)
        self.network = net.to(self.device)
        self.batch_size = batch_size

    @classmethod
    def from_network(cls, net: EmojiFeatureNet, name: str, batch_size: int = 256) -> "EmojiFeatures":
        """Wrap an in-memory network (during training, in tests) without writing it to disk."""
        self = cls.__new__(cls)
        self.config, self.name, self.input_size = dict(net.config), name, net.config["input_size"]
        self.device = next(net.parameters()).device
        self.network, self.batch_size = net, batch_size
        return self

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images, self.network.features)

    def style_adherence(self, images: torch.Tensor, captions: list[str]) -> float | None:
        """Share of ``images`` the style head assigns the style their caption ends with ("..., noto style"):
        an offline, CLIP-free measure of prompt adherence (of the style only; the head is right on 89% of
        held-out real renders, see the model card). None when a caption names none of the known styles."""
        matches = self.style_matches(images, captions)
        return None if matches is None else matches.float().mean().item()

    @torch.inference_mode()
    def style_matches(self, images: torch.Tensor, captions: list[str]) -> torch.Tensor | None:
        """Per image, whether the style head assigns the style its caption names (bool ``[N]``), so a set scored
        batch by batch adds up to :meth:`style_adherence`; None when a caption names no known style."""
        styles = [caption_style(c, self.config.get("styles", [])) for c in captions]
        if len(captions) != images.shape[0] or None in styles:
            return None
        predicted = self._run(images, lambda x: self.network.style_head(self.network.features(x)).argmax(1))
        return predicted == torch.tensor(styles)

    def _run(self, images: torch.Tensor, head) -> torch.Tensor:
        """``head`` over batches of ``images`` resized to the input size, in eval mode (training mode restored)."""
        check_images(images)
        was_training = self.network.training
        self.network.eval()
        try:
            return torch.cat([
                head(resize_images(images[i:i + self.batch_size].float(), self.input_size).to(self.device)).cpu()
                for i in range(0, images.shape[0], self.batch_size)
            ]).float()
        finally:
            self.network.train(was_training)


def caption_style(caption: str, styles: list[str]) -> int | None:
    """Index of the style a caption of the emoji data set ends with ("grinning face, noto style"), else None."""
    text = caption.strip().lower()
    return next((i for i, style in enumerate(styles) if text.endswith(style)), None)
