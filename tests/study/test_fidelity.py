"""study/fidelity.py: torch-fidelity metrics in the classifiers' feature spaces, offline.

FID between two samples of one distribution is small and grows when modes are dropped; a set against itself gives
~0; keys name their feature space; reference statistics are cached under a content + weights hash; no file a user can
write is unpickled; bad inputs fail in one line. (The Inception and DINOv2 detectors: tests/study/test_detectors.py.)
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages import classifier
from study import classifier as study_classifier
from study import fidelity
from study.errors import StageError
from helpers import section, shapes

TINY = section("classifier", steps=100, batch_size=32, lr=5e-3, width=16, feature_dim=32, max_shift=1)


CLF_KEYS = {"fid_clf", "kid_clf_mean", "kid_clf_std", "precision_clf", "recall_clf", "f_score_clf", "isc_clf_mean", "isc_clf_std"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fid") / "classifier"
    result = classifier.run(TINY, section("base", seed=0), shapes(400, seed=0), shapes(200, seed=1), out)
    assert result["accuracy"] >= 0.9
    return out


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return shapes(300, seed=10)[0]


def quality(generated: torch.Tensor, reference: torch.Tensor, clf_dir: Path, cache: Path, *, second: bool = False,
            **kwargs) -> dict:
    kwargs = {"kid_subset_size": 100, "reference_name": "shapes", **kwargs}
    space = fidelity.classifier_space(clf_dir, second=second)
    return fidelity.compute_quality(generated, reference, space, cache_dir=cache, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Classifier features: the numbers mean something.


def test_fid_small_within_a_distribution_and_larger_when_modes_drop(clf_dir: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    same = quality(shapes(300, seed=11)[0], reference, clf_dir, tmp_path)
    dropped = quality(shapes(300, seed=12, classes=(0, 1))[0], reference, clf_dir, tmp_path)  # half the modes
    assert set(same) == set(dropped) == CLF_KEYS and "fid" not in same
    assert all(math.isfinite(v) for v in same.values())
    assert 0 < same["fid_clf"] and dropped["fid_clf"] > 5 * same["fid_clf"]
    assert dropped["kid_clf_mean"] > same["kid_clf_mean"]
    assert dropped["recall_clf"] < same["recall_clf"] - 0.1  # dropped modes cost recall ...
    assert same["precision_clf"] > 0.8 and dropped["precision_clf"] > 0.8  # ... not precision
    assert dropped["isc_clf_mean"] < same["isc_clf_mean"]  # fewer confidently predicted classes


def test_the_second_feature_space_is_another_network_that_sees_the_same_drop(clf_dir: Path, reference: torch.Tensor,
                                                                            tmp_path: Path) -> None:
    first = study_classifier.load_classifier(clf_dir / study_classifier.WEIGHTS)
    second = study_classifier.load_classifier(clf_dir / study_classifier.WEIGHTS2)
    assert type(first) is study_classifier.Classifier and type(second) is study_classifier.PooledClassifier
    assert second.architecture["architecture"] == study_classifier.ARCHITECTURE2
    same = quality(shapes(300, seed=11)[0], reference, clf_dir, tmp_path, second=True)
    dropped = quality(shapes(300, seed=12, classes=(0, 1))[0], reference, clf_dir, tmp_path, second=True)
    assert set(same) == {k.replace("clf", "clf2") for k in CLF_KEYS}
    assert 0 < same["fid_clf2"] and dropped["fid_clf2"] > 5 * same["fid_clf2"]
    assert dropped["recall_clf2"] < same["recall_clf2"] - 0.1


def test_a_set_against_itself(clf_dir: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    result = quality(reference, reference, clf_dir, tmp_path)
    assert abs(result["fid_clf"]) < 1e-6
    assert result["precision_clf"] == result["recall_clf"] == 1.0


def test_rgb_images_expand_and_resize_inside_the_extractor(clf_dir: Path) -> None:
    from torch_fidelity.utils import create_feature_extractor

    name = fidelity.register_classifier_extractor()
    assert fidelity.register_classifier_extractor() == name  # a second registration is a no-op, not an assertion
    extractor = create_feature_extractor(
        name, ["clf_features", "clf_logits"], cuda=False, verbose=False,
        feature_extractor_weights_path=str(clf_dir / classifier.WEIGHTS),
    )
    gray = shapes(8, seed=3)[0]
    item = fidelity.ImageTensorDataset(gray)[0]
    assert item.dtype == torch.uint8 and item.shape == (3, 16, 16)
    features, logits = extractor(gray.expand(-1, 3, -1, -1))
    expected_features, expected_logits = study_classifier.load_classifier(clf_dir)(gray)
    assert features.dtype == torch.float64 and torch.allclose(features, expected_features.double())
    assert torch.allclose(logits, expected_logits.double())
    big = torch.nn.functional.interpolate(gray.float(), size=(32, 32), mode="nearest").to(torch.uint8)
    assert extractor(big.expand(-1, 3, -1, -1))[0].shape == (8, 32)


def test_prc_uses_the_classifier_not_vgg16(clf_dir: Path, reference: torch.Tensor, tmp_path: Path, monkeypatch) -> None:
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    def no_vgg(*args, **kwargs):
        raise AssertionError("VGG-16 (and its download) must not be used")

    monkeypatch.setattr(FeatureExtractorVGG16, "__init__", no_vgg)
    result = quality(shapes(120, seed=4)[0], reference, clf_dir, tmp_path, prc=True, isc=False)
    assert {"precision_clf", "recall_clf"} <= set(result) and "isc_clf_mean" not in result
    assert "precision_clf" not in quality(shapes(120, seed=4)[0], reference, clf_dir, tmp_path, prc=False)


# --------------------------------------------------------------------------------------------------------------
# The reference-statistics cache.


def test_cache_name_follows_content_and_weights(clf_dir: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    space = fidelity.classifier_space(clf_dir)
    name = space.cache_name(reference, "ref")
    assert name == fidelity.classifier_space(clf_dir).cache_name(reference.clone(), "ref")
    assert name.startswith(f"ref-{fidelity.content_hash(reference)}-clf")
    assert fidelity.classifier_space(clf_dir, second=True).cache_name(reference, "ref") != name  # the other classifier
    changed = reference.clone()
    changed[0, 0, 0, 0] ^= 1  # one bit of one pixel
    assert space.cache_name(changed, "ref") != name
    assert space.cache_name(reference[:-1], "ref") != name
    retrained = tmp_path / "retrained"
    classifier.run(TINY, section("base", seed=1), shapes(400, seed=0), shapes(200, seed=1), retrained)
    assert fidelity.classifier_space(retrained).cache_name(reference, "ref") != name
    with pytest.raises(StageError, match="reference_name 'a/b'"):
        space.cache_name(reference, "a/b")


def test_second_call_hits_the_cache_and_a_changed_reference_never_reuses_it(
    clf_dir: Path, reference: torch.Tensor, tmp_path: Path, monkeypatch
) -> None:
    import torch_fidelity.utils

    extracted: list[int] = []
    real = torch_fidelity.utils.get_featuresdict_from_dataset

    def spy(dataset, *args, **kwargs):
        extracted.append(len(dataset))
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "get_featuresdict_from_dataset", spy)
    cache = tmp_path / "cache"
    generated = shapes(300, seed=11)[0]
    name = fidelity.classifier_space(clf_dir).cache_name(reference, "shapes")

    first = quality(generated, reference, clf_dir, cache)
    assert sorted(p.name for p in cache.iterdir()) == [f"{name}.safetensors"]  # safetensors: loading runs no code
    assert extracted == [300, len(reference)]
    second = quality(generated, reference, clf_dir, cache)
    assert extracted[2:] == [300]  # the reference came from the cache
    assert second == first

    # Another reference under the same reference_name: a new cache entry, and the same numbers as with no cache.
    other = shapes(300, seed=20, classes=(2, 3))[0]
    changed = quality(generated, other, clf_dir, cache)
    assert extracted[3:] == [300, 300]
    assert changed == quality(generated, other, clf_dir, tmp_path / "fresh")
    assert changed["fid_clf"] != first["fid_clf"]
    assert len(list(cache.iterdir())) == 2


def test_the_metrics_are_torch_fidelitys_calculate_metrics(clf_dir: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    """Features extracted here and torch-fidelity's metric functions give calculate_metrics' numbers exactly."""
    from torch_fidelity import calculate_metrics

    generated = shapes(300, seed=12)[0]
    ours = quality(generated, reference, clf_dir, tmp_path / "cache", kid_subsets=10)
    theirs = calculate_metrics(
        input1=fidelity.ImageTensorDataset(generated), input2=fidelity.ImageTensorDataset(reference), fid=True, kid=True,
        prc=True, isc=True, feature_extractor=fidelity.register_classifier_extractor(),
        feature_extractor_weights_path=str(clf_dir / classifier.WEIGHTS), kid_subset_size=100, kid_subsets=10,
        isc_splits=10, prc_neighborhood=fidelity.PRC_NEIGHBORHOOD, cuda=False, batch_size=200, cache=False,
        save_cpu_ram=True, rng_seed=2020, verbose=False)
    assert ours["fid_clf"] == theirs["frechet_inception_distance"]
    assert ours["kid_clf_mean"] == theirs["kernel_inception_distance_mean"]
    assert ours["precision_clf"] == theirs["precision"] and ours["recall_clf"] == theirs["recall"]
    assert ours["isc_clf_mean"] == theirs["inception_score_mean"]


# --------------------------------------------------------------------------------------------------------------
# Trust: torch-fidelity's pickle cache is never read.


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_no_file_a_user_can_write_is_unpickled_by_torch_fidelity(clf_dir, reference, tmp_path, monkeypatch) -> None:
    """Payloads where torch-fidelity would unpickle (its cache, its Inception weights in the torch hub cache) never
    run: its cache is never read, and its Inception is never built (the project's detector is study/detectors.py)."""
    import pickle

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_Payload(marker))
    # torch-fidelity's own cache, under every name it would look for in the cache directory: never read.
    cache = tmp_path / "cache"
    cache.mkdir()
    name = fidelity.classifier_space(clf_dir).cache_name(reference, "shapes")
    for suffix in ("-scm-classifier-features-clf_features.pt", "-scm-classifier-stat-fid-clf_features.pt"):
        (cache / f"{name}{suffix}").write_bytes(payload)
    # torch-fidelity's Inception weights, waiting in the torch hub cache.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    hub = tmp_path / "torch-home" / "hub" / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[1]
    hub.parent.mkdir(parents=True)
    hub.write_bytes(payload)
    for second in (False, True):
        result = quality(shapes(300, seed=11)[0], reference, clf_dir, cache, second=second)
        assert math.isfinite(result["fid_clf2" if second else "fid_clf"])
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# Bad inputs fail in one line, naming what is wrong.


@pytest.mark.parametrize(
    "generated, reference_override, match",
    [
        (shapes(50, seed=1)[0], None, r"evaluate.kid_subset_size=100 images per set, got 50 generated and 300 reference"),
        (None, shapes(60, seed=1)[0], r"evaluate.kid_subset_size=100 images per set, got 300 generated and 60 reference"),
        (shapes(300, seed=1, size=20)[0], None, r"generated images are \(1, 20, 20\) .* reference images are \(1, 16, 16\)"),
        (shapes(300, seed=1)[0].expand(-1, 3, -1, -1), None, r"generated images are \(3, 16, 16\) .* reference images are \(1, 16, 16\)"),
        (shapes(300, seed=1)[0].float(), None, "generated images: expected dtype torch.uint8"),
        (None, shapes(300, seed=1)[0].float() / 255, "reference images: expected dtype torch.uint8"),
        (shapes(300, seed=1)[0].repeat(1, 2, 1, 1), None, r"expected shape \(N, C, H, W\) with C = 1 or 3, got \(300, 2, 16, 16\)"),
        (shapes(300, seed=1)[0][:, 0], None, r"got \(300, 16, 16\)"),
    ],
)
def test_rejects_bad_images(clf_dir: Path, reference: torch.Tensor, tmp_path: Path, generated, reference_override, match) -> None:
    generated = shapes(300, seed=11)[0] if generated is None else generated
    with pytest.raises(StageError, match=match):
        quality(generated, reference if reference_override is None else reference_override, clf_dir, tmp_path)


def test_rejects_missing_or_mismatched_classifier(clf_dir: Path, reference: torch.Tensor, tmp_path: Path) -> None:
    generated = shapes(300, seed=11)[0]
    with pytest.raises(StageError, match=f"{tmp_path / 'none' / classifier.WEIGHTS}: classifier weights not found"):
        quality(generated, reference, tmp_path / "none", tmp_path)
    with pytest.raises(StageError, match="model2.safetensors: classifier weights not found"):
        quality(generated, reference, tmp_path / "none", tmp_path, second=True)

    state = load_file(str(clf_dir / classifier.WEIGHTS))
    state["head.weight"] = torch.zeros(9, 32)
    wrong = tmp_path / "wrong" / classifier.WEIGHTS
    wrong.parent.mkdir()
    save_file(state, str(wrong), metadata={"classifier": _metadata(clf_dir)})
    with pytest.raises(StageError, match=r"tensor 'head.weight' has shape \(9, 32\), .* expects \(4, 32\)"):
        quality(generated, reference, wrong.parent, tmp_path)

    rgb = shapes(300, seed=11)[0].expand(-1, 3, -1, -1)
    with pytest.raises(StageError, match="reads 1-channel images, the images have 3 channels"):
        quality(rgb, reference.expand(-1, 3, -1, -1), clf_dir, tmp_path)
    with pytest.raises(StageError, match="space: expected a FeatureSpace"):
        fidelity.compute_quality(generated, reference, "vgg", kid_subset_size=10, cache_dir=tmp_path, reference_name="x")


def _metadata(clf_dir: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(clf_dir / classifier.WEIGHTS), framework="pt") as f:
        return f.metadata()["classifier"]


# --------------------------------------------------------------------------------------------------------------
# Spread over sample seeds.


def test_summarise_seeds() -> None:
    runs = [
        {"fid_clf": 1.0, "fid_inception": None, "inception_status": "offline"},
        {"fid_clf": 2.0, "fid_inception": None, "inception_status": "offline"},
        {"fid_clf": 6.0, "fid_inception": None, "inception_status": "offline"},
    ]
    summary = fidelity.summarise_seeds(runs)
    assert summary["fid_clf"] == {"mean": 3.0, "std": pytest.approx(math.sqrt(7.0)), "min": 1.0, "max": 6.0, "n": 3}
    assert summary["fid_inception"] == {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    assert summary["inception_status"] == "offline"
    assert fidelity.summarise_seeds([{"fid_clf": 4.0}])["fid_clf"]["std"] is None
    with pytest.raises(StageError, match="no results"):
        fidelity.summarise_seeds([])
