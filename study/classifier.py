"""The classifiers behind ``fid_clf`` and ``fid_clf2``: their networks and weights files.

Inception-v3 features are ImageNet features; on 28×28 digits they measure little and cost a lot. Like the MNIST FIDs
in the consistency-model literature, the study also compares samples in the feature space of a small CNN trained on
the data itself (``stages/classifier.py`` trains it): its penultimate layer feeds FID/KID/precision-recall
(:mod:`study.fidelity`). The numbers are comparable only between runs that use the same weights, so their sha256 is
recorded and goes into every cache name.

A claim that holds in one feature space only is not yet a claim, so there are two, trained independently on the same
split: ``clf`` (:class:`Classifier`, two strided convolutions, seed ``base.seed``) and ``clf2``
(:class:`PooledClassifier`, three 3×3 convolutions with max pooling and global average pooling, seed
``base.seed + 1``). Both files carry their architecture in their metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from study.errors import StageError

WEIGHTS = "model.safetensors"  # clf
WEIGHTS2 = "model2.safetensors"  # clf2
ARCHITECTURE = "scm-cnn-v1"  # bump when Classifier changes shape, so old weight files are rejected, not misread
ARCHITECTURE2 = "scm-pool-cnn-v1"  # the same for PooledClassifier


class _Network(nn.Module):
    """What both classifiers share: the architecture record (saved in the weights' metadata) and the input shape."""

    ARCHITECTURE: str

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int, feature_dim: int):
        super().__init__()
        self.architecture = {
            "architecture": self.ARCHITECTURE,
            "in_channels": int(in_channels),
            "image_size": [int(image_size[0]), int(image_size[1])],
            "num_classes": int(num_classes),
            "width": int(width),
            "feature_dim": int(feature_dim),
        }

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.architecture["in_channels"], *self.architecture["image_size"])


class Classifier(_Network):
    """Two strided convolutions, a ``feature_dim`` penultimate layer and a linear head.

    Reads uint8 ``(N, C, H, W)`` images and returns ``(features, logits)``: the post-ReLU penultimate activations
    ``(N, feature_dim)`` used for FID/KID/PRC, and the logits ``(N, num_classes)`` used for accuracy and the classifier
    score. About 0.5 M multiply-adds per 28×28 image at ``width=32``: training fits a CPU-minute budget.
    """

    ARCHITECTURE = ARCHITECTURE

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 32, feature_dim: int = 128):
        super().__init__(in_channels, image_size, num_classes, width, feature_dim)
        h, w = ((s - 1) // 4 + 1 for s in image_size)  # two stride-2 convolutions, rounding up
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width * h * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float() / 127.5 - 1  # uint8 [0, 255] -> [-1, 1]
        x = F.relu(self.conv1(x))  # (N, width, H/2, W/2)
        x = F.relu(self.conv2(x))  # (N, 2·width, H/4, W/4)
        features = F.relu(self.fc(x.flatten(1)))  # (N, feature_dim)
        return features, self.head(features)


class PooledClassifier(_Network):
    """The second feature space: 3×3 convolutions of ``width``, ``2·width`` and ``4·width`` channels, each followed by
    ReLU and 2×2 max pooling (the last by global average pooling), a ``feature_dim`` layer and a linear head.

    Same interface as :class:`Classifier`; about 1.7 M multiply-adds per 28×28 image at ``width=16``.
    """

    ARCHITECTURE = ARCHITECTURE2

    def __init__(self, in_channels: int, image_size: tuple[int, int], num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__(in_channels, image_size, num_classes, width, feature_dim)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1)
        self.fc = nn.Linear(4 * width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = images.float() / 127.5 - 1  # uint8 [0, 255] -> [-1, 1]
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, ceil_mode=True)  # (N, width, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, ceil_mode=True)  # (N, 2·width, H/4, W/4)
        x = F.relu(self.conv3(x)).mean(dim=(2, 3))  # (N, 4·width), global average pooling
        features = F.relu(self.fc(x))  # (N, feature_dim)
        return features, self.head(features)


ARCHITECTURES = {ARCHITECTURE: Classifier, ARCHITECTURE2: PooledClassifier}  # the metadata tag -> its network


def save_classifier(net: Classifier | PooledClassifier, path: Path) -> None:
    """Weights as safetensors, with the architecture in the file's metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={"classifier": json.dumps(net.architecture, sort_keys=True)})


def held_out_accuracy(directory: str | Path, key: str = "accuracy") -> float | None:
    """The eval-split accuracy (``key``: ``accuracy`` of clf, ``accuracy2`` of clf2) recorded in ``classifier.json``
    beside the weights (None if it records none)."""
    info = Path(directory) / "classifier.json"
    if not info.is_file():
        return None
    try:
        value = json.loads(info.read_text()).get(key)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise StageError(f"{info}: not a JSON object (not written by stages.classifier?)") from None
    return float(value) if isinstance(value, (int, float)) else None


def load_classifier(path: str | Path) -> Classifier | PooledClassifier:
    """Rebuild a classifier from its weights file (or ``model.safetensors`` in a directory), in eval mode on the CPU.

    Raises :class:`StageError`, naming the path, for a missing file, a file that is not safetensors, one without the
    architecture metadata written by :func:`save_classifier`, or tensors whose shapes do not match that architecture.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        path = path / WEIGHTS
    if not path.is_file():
        raise StageError(f"{path}: classifier weights not found (run the classifier stage first)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StageError(f"{path}: not a safetensors file ({' '.join(str(e).split())})") from None
    try:
        arch = json.loads(metadata["classifier"])
        network = ARCHITECTURES[arch.pop("architecture")]
        net = network(arch["in_channels"], tuple(arch["image_size"]), arch["num_classes"], arch["width"], arch["feature_dim"])
    except (KeyError, TypeError, ValueError):
        raise StageError(f"{path}: no {' or '.join(ARCHITECTURES)} architecture in its metadata (not written by "
                         "stages.classifier?)") from None
    expected = net.state_dict()
    for name in sorted(set(expected) | set(state)):
        if name not in state:
            raise StageError(f"{path}: tensor {name!r} is missing (architecture {arch})")
        if name not in expected:
            raise StageError(f"{path}: unexpected tensor {name!r} (architecture {arch})")
        if state[name].shape != expected[name].shape:
            raise StageError(
                f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, the architecture in its metadata "
                f"expects {tuple(expected[name].shape)}"
            )
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)

