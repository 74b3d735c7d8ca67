"""stages/evaluate.py: the reference images of each evaluate.reference, and the feature spaces each setting scores in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stages import data, evaluate
from study.errors import StageError
from helpers import section, shapes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_reference_is_a_split_or_every_prepared_image(tmp_path: Path) -> None:
    from study.images import load_split

    data.run(section("data", max_images=40, eval_fraction=0.25), 0, tmp_path / "prepared")
    train, _ = load_split(tmp_path / "prepared", "train")
    held_out, _ = load_split(tmp_path / "prepared", "eval")
    for reference, expected in (("eval", held_out), ("train", train), ("all", torch.cat([train, held_out]))):
        images, text = evaluate.reference_images(tmp_path / "prepared", reference)
        assert torch.equal(images, expected) and f"({len(expected)}" in text, reference
    assert len(evaluate.reference_images(tmp_path / "prepared", "all")[0]) == 40


def test_the_feature_spaces_follow_the_switches(tmp_path: Path) -> None:
    from stages import classifier

    classifier.run(section("classifier", steps=5), section("base"), shapes(40, seed=0), shapes(20, seed=1), tmp_path / "clf")
    spaces, status = evaluate.feature_spaces(section("evaluate"), tmp_path / "clf", tmp_path / "cache")
    assert [s.name for s in spaces] == ["clf", "clf2"]
    assert status["inception"].startswith("off (evaluate.inception: off") and status["dinov2"].startswith("off")
    spaces, status = evaluate.feature_spaces(section("evaluate", inception="on"), tmp_path / "clf", tmp_path / "cache")
    assert [s.name for s in spaces] == ["clf", "clf2", "inception"] and status["inception"] == "ok"
    with pytest.raises(StageError, match="give its sha256 as evaluate.inception_sha256"):
        evaluate.feature_spaces(section("evaluate", inception="on", inception_weights=str(tmp_path / "x.pt")),
                                tmp_path / "clf", tmp_path / "cache")
    (tmp_path / "hf").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        spaces, status = evaluate.feature_spaces(section("evaluate", dinov2="on", dinov2_weights="nobody/no-such-dinov2"),
                                                 tmp_path / "clf", tmp_path / "cache")
    assert [s.name for s in spaces] == ["clf", "clf2"] and "FD-DINOv2 skipped" in status["dinov2"]


def test_the_headline_is_the_mean_or_the_minimum_over_seed_sets_and_ratios_use_it() -> None:
    from study.fidelity import summarise_seeds

    per_seed = {"teacher": [{"fid_clf": 10.0, "fd_dinov2": 100.0}, {"fid_clf": 14.0}],
                "scm1": [{"fid_clf": 20.0, "fd_dinov2": 150.0}, {"fid_clf": 12.0}],
                "scm2": [{"fid_clf": 11.0, "fd_dinov2": 120.0}, {"fid_clf": 13.0}],
                "recon": [{"fid_clf": 1.0}]}
    summary = {m: summarise_seeds(v) for m, v in per_seed.items()}
    mean = evaluate.headline_metrics(summary, ["clf", "dinov2"], "mean")
    assert mean["fid_clf_teacher"] == 12.0 and mean["fid_clf_scm2"] == 12.0 and mean["fid_clf_ratio_scm1"] == 16 / 12
    assert mean["fid_clf_teacher_std"] == pytest.approx(2 ** 1.5) and "fid_clf_recon_std" not in mean
    assert mean["fd_dinov2_ratio_scm2"] == 1.2 and "fd_dinov2_teacher_std" not in mean  # one set: no spread
    low = evaluate.headline_metrics(summary, ["clf", "dinov2"], "min")
    assert (low["fid_clf_teacher"], low["fid_clf_scm1"], low["fid_clf_scm2"]) == (10.0, 12.0, 11.0)
    assert low["fid_clf_ratio_scm2"] == 1.1 and low["fid_clf_teacher_std"] == mean["fid_clf_teacher_std"]
