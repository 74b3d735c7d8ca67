"""Sample-quality metrics through torch-fidelity: FID, KID, precision/recall and the classifier/Inception score.

Two feature spaces, never mixed under one name:

- ``clf``: the small CNN of :mod:`study.classifier`, registered with torch-fidelity as the feature extractor
  ``scm-classifier``. Its penultimate layer feeds FID/KID/PRC and its logits the classifier score. Keys:
  ``fid_clf``, ``kid_clf_mean``, ``kid_clf_std``, ``precision_clf``, ``recall_clf``, ``f_score_clf``,
  ``isc_clf_mean``, ``isc_clf_std``. Comparable only between runs that use the same classifier weights.
- ``inception``: torch-fidelity's ``inception-v3-compat`` (the TF-ported Inception of the FID literature). Keys:
  ``fid_inception``, ``kid_inception_mean``/``_std``, ``isc_inception_mean``/``_std``, ``precision_inception``,
  ``recall_inception``, ``f_score_inception`` and ``inception_status``. Note: precision/recall here use the Inception
  pool3 (2048-d) features, not the VGG-16 features of Kynkäänniemi et al. (torch-fidelity's default), so that the
  one pinned weights file serves every metric and nothing is downloaded.

Offline behaviour. ``inception_weights`` should be a local copy of torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``. A given path that is missing or malformed is a user error
(:class:`StageError` naming the path). With no path: a copy already in the torch hub cache is used; otherwise, when
``SCM_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` is set, or ``github.com:443`` cannot be reached within
``ONLINE_PROBE_TIMEOUT_S`` seconds (checked up front, so a machine without internet answers in milliseconds instead of
hanging in a download), or the download fails, the result is ``{"fid_inception": None, "inception_status": "<why>"}``;
no other number is ever substituted. On a 2-core CPU, FID-Inception spends ~15-40 s in ``numpy.linalg.eigvals`` of a
2048×2048 matrix, whatever N.

Nothing is unpickled. torch-fidelity would unpickle (a full ``torch.load``) two kinds of file: its own feature and
statistics cache, and the Inception weights. Its cache is never used: the features of the reference set are cached
here, as safetensors, under ``cache_dir``, with a name holding the reference's content hash and the extractor's
identity (the sha256 of its weights file), so a changed reference set or a retrained classifier never reuses stale
features (:func:`reference_cache_name`). The metrics come from those features through torch-fidelity's own metric
functions, so they are the numbers ``calculate_metrics`` gives. The Inception weights are read with
``torch.load(weights_only=True)``, which refuses anything but tensors without running it, and torch-fidelity gets a
private copy re-saved from those tensors (:func:`plain_weights_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from study.classifier import WEIGHTS, load_classifier
from study.errors import StageError
from study.files import atomic_replace_file, read_tensors

CLF_EXTRACTOR = "scm-classifier"  # our name in torch-fidelity's feature-extractor registry
INCEPTION_EXTRACTOR = "inception-v3-compat"
INCEPTION_URL_NAME = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.4's download, as cached by torch.hub
ONLINE_PROBE = ("github.com", 443)  # where torch-fidelity downloads the Inception weights from
ONLINE_PROBE_TIMEOUT_S = 3.0
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


def reference_cache_name(reference: Tensor, *, features: str, weights_path: str | Path, reference_name: str) -> str:
    """The name of the reference's cached features: ``<reference_name>-<content hash>-<features><weights hash>``.

    Both the reference's content and the extractor's weights are in it, so neither can change without a new entry.
    """
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", reference_name):
        raise StageError(f"reference_name {reference_name!r}: use letters, digits, '_', '.' and '-' only (it names cache files)")
    return f"{reference_name}-{content_hash(reference)}-{features}{file_hash(Path(weights_path))}"


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
# Inception weights: a given path, the torch hub cache, or a download when online.


def _offline_reason() -> str | None:
    """Why a download cannot work here, decided up front (no hanging on a machine without internet), or None."""
    for var in ("SCM_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    try:
        with socket.create_connection(ONLINE_PROBE, timeout=ONLINE_PROBE_TIMEOUT_S):
            return None
    except OSError as e:
        return f"{ONLINE_PROBE[0]}:{ONLINE_PROBE[1]} is unreachable ({type(e).__name__}: {e})"


def check_inception_weights(path: Path) -> None:
    """Raise :class:`StageError` naming ``path`` unless torch-fidelity's Inception would load it.

    The network is built on the meta device, so the check loads the file and matches every tensor name and shape
    against ``inception-v3-compat`` without allocating or initialising its 24 M parameters.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if not path.is_file():
        raise StageError(f"evaluate.inception_weights={str(path)!r}: file not found")
    try:
        with plain_weights_copy(path) as copy, torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op", once per tensor
            FeatureExtractorInceptionV3(INCEPTION_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(copy))
    except StageError as e:  # not a plain state_dict: refused before anything in it ran
        raise StageError(f"evaluate.inception_weights={str(path)!r}: not torch-fidelity's {INCEPTION_EXTRACTOR} "
                         f"state_dict ({str(e).removeprefix(f'{path}: ')})") from None
    except Exception as e:  # missing keys, size mismatches: all mean "not these weights"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines[0] if lines else "")
        raise StageError(
            f"evaluate.inception_weights={str(path)!r}: not torch-fidelity's {INCEPTION_EXTRACTOR} state_dict "
            f"({type(e).__name__}: {detail[:300]})"
        ) from None


@contextlib.contextmanager
def plain_weights_copy(path: Path) -> Iterator[Path]:
    """A private copy of the state dict in ``path``, re-saved from plain tensors, for torch-fidelity to load.

    ``path`` is read with ``torch.load(weights_only=True)``: a file holding anything but tensors (a ``__reduce__``
    payload) is refused before any of it runs. torch-fidelity then unpickles only the copy written here, from those
    tensors, in a directory only this user can read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StageError(f"{path}: not a plain state_dict of tensors (refused without running it: {first})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise StageError(f"{path}: not a state_dict (a mapping of names to tensors)")
    with tempfile.TemporaryDirectory(prefix="scm-weights-") as tmp:  # mode 0700
        copy = Path(tmp) / Path(path).name
        torch.save(state, copy)
        yield copy


def resolve_inception_weights(inception_weights: str | Path | None) -> tuple[Path | None, str]:
    """``(path, status)``: a usable weights file and ``"ok"``, or ``None`` and one line saying why not."""
    if inception_weights:
        path = Path(inception_weights)
        check_inception_weights(path)
        return path, "ok"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL_NAME
    if cached.is_file():
        try:
            check_inception_weights(cached)
            return cached, "ok"
        except StageError as e:
            return None, f"the cached Inception weights are unusable: {e}"
    reason = _offline_reason()
    if reason:
        return None, f"no evaluate.inception_weights given and offline ({reason}); FID-Inception skipped"
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False, map_location="cpu", check_hash=True)
    except Exception as e:
        return None, f"downloading the Inception weights failed ({type(e).__name__}: {' '.join(str(e).split())[:200]}); FID-Inception skipped"
    return resolve_inception_weights(None) if cached.is_file() else (None, f"download did not produce {cached}")


# --------------------------------------------------------------------------------------------------------------
# The metrics.


def compute_quality(
    generated: Tensor,
    reference: Tensor,
    *,
    features: Literal["clf", "inception"],
    classifier_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
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
) -> dict[str, Any]:
    """FID, KID, precision/recall (and the classifier/Inception score of ``generated``) in one feature space.

    ``generated`` and ``reference`` are uint8 ``(N, C, H, W)`` tensors with C = 1 or 3 and equal ``(C, H, W)``. FID, KID
    and PRC compare ``generated`` (torch-fidelity's input1) against ``reference`` (input2, whose features and FID
    statistics are cached in ``cache_dir``). ``features="clf"`` needs ``classifier_dir`` (or its ``model.safetensors``).
    Returns flat keys suffixed by the feature space (module docstring); for ``inception`` without usable weights,
    ``{"fid_inception": None, "inception_status": "..."}``.
    """
    if features not in ("clf", "inception"):
        raise StageError(f"features={features!r}: expected 'clf' or 'inception'")
    check_images(generated, reference, kid_subset_size=kid_subset_size, prc=prc)
    generated, reference = generated.cpu(), reference.cpu()  # torch-fidelity batches on the CPU, then moves to `device`

    # The extractor and the identity of its weights.
    if features == "clf":
        if classifier_dir is None:
            raise StageError("features='clf' needs classifier_dir (the classifier stage's output, e.g. artifacts/classifier)")
        weights = Path(classifier_dir)
        weights = weights / WEIGHTS if weights.is_dir() or weights.suffix != ".safetensors" else weights
        net = load_classifier(weights)  # StageError for a missing or wrong-shaped file, before torch-fidelity runs
        if net.input_shape[0] != generated.shape[1]:
            raise StageError(
                f"the classifier in {weights} reads {net.input_shape[0]}-channel images, the images have "
                f"{generated.shape[1]} channels (a classifier trained on another dataset?)"
            )
        extractor, status = register_classifier_extractor(), None
    else:
        weights, status = resolve_inception_weights(inception_weights)
        if weights is None:
            return {"fid_inception": None, "inception_status": status}
        extractor = INCEPTION_EXTRACTOR

    # The chosen extractor serves every metric (no VGG-16 for PRC, nothing downloaded). The reference's features
    # come from this project's cache when it holds them; torch-fidelity's own (pickle) cache is never used.
    cache_name = reference_cache_name(reference, features=features, weights_path=weights, reference_name=reference_name)
    cache_file = Path(cache_dir) / f"{cache_name}.safetensors"
    cuda = str(device).startswith("cuda")
    with contextlib.ExitStack() as stack:
        if cuda:
            stack.enter_context(torch.cuda.device(torch.device(device)))
        weights_file = stack.enter_context(plain_weights_copy(weights)) if features == "inception" else weights
        raw = _metrics(generated, reference, extractor=extractor, weights=weights_file, cache_file=cache_file,
                       prc=prc, isc=isc, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                       isc_splits=min(10, len(generated)), cuda=cuda, batch_size=batch_size, rng_seed=rng_seed,
                       verbose=verbose)
    out = {_KEYS[k].format(fs=features): float(v) for k, v in raw.items() if k in _KEYS}
    if status is not None:
        out["inception_status"] = status
    return out


def _metrics(generated: Tensor, reference: Tensor, *, extractor: str, weights: Path, cache_file: Path, prc: bool,
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
    net = create_feature_extractor(extractor, generated_layers, cuda=cuda, feature_extractor_weights_path=str(weights),
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
