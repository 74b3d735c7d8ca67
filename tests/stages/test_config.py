"""stages/config.py: the project's params.yaml resolves under every profile; the training-reliability keys are
typed and range-checked; a bare YAML `off` is read as the string it was meant to be."""

from __future__ import annotations

import pytest

from stages.common import REPO_ROOT, StageError
from stages.config import load, parse_overrides, resolve


@pytest.mark.parametrize("profile", ["default", "smoke", "cifar10-gpu", "imagenet512-gpu"])
def test_every_profile_of_the_project_resolves(profile):
    p = load(REPO_ROOT / "params.yaml", profile)
    gpu = profile.endswith("-gpu")
    assert p.base.precision == ("bf16" if gpu else "fp32")
    assert p.base.checkpoint_dir == "checkpoints"
    assert p.teacher.checkpoint_every > 0 and p.distill.checkpoint_every > 0 and p.encode.checkpoint_every > 0
    assert p.teacher.max_nonfinite_steps == p.distill.max_nonfinite_steps == 20


@pytest.mark.parametrize("override, named", [
    ("base.precision=fp16", "base.precision: expected one of 'fp32', 'bf16', got 'fp16'"),
    ("teacher.checkpoint_every=-1", "teacher.checkpoint_every"),
    ("distill.batch_per_device=-8", "distill.batch_per_device"),
    ("distill.max_nonfinite_steps=0", "distill.max_nonfinite_steps"),
    ("base.checkpoint_dir=3", "base.checkpoint_dir: expected str, got 3"),
])
def test_reliability_keys_are_checked(override, named):
    with pytest.raises(StageError, match=named.replace("(", r"\(")):
        resolve({}, overrides=parse_overrides([override]))


def test_a_bare_yaml_off_means_the_string_off():
    assert resolve({}, overrides=parse_overrides(["evaluate.inception=off"])).evaluate.inception == "off"
    with pytest.raises(StageError, match="distill.method: expected one of 'scd', 'sct', got False"):
        resolve({}, overrides=parse_overrides(["distill.method=off"]))  # only where 'off' is a choice
