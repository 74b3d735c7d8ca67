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
