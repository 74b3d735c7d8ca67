"""stages/config.py: the project's params.yaml resolves under every profile; the training-reliability keys are
typed and range-checked; a bare YAML `off` is read as the string it was meant to be."""

from __future__ import annotations

import pytest

from study.errors import StageError
from study.files import REPO_ROOT
from study.params import load, parse_overrides, resolve
from helpers import default_raw


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
        resolve(default_raw(), overrides=parse_overrides([override]))


def test_a_bare_yaml_off_means_the_string_off():
    assert resolve(default_raw(), overrides=parse_overrides(["evaluate.inception=off"])).evaluate.inception == "off"
    with pytest.raises(StageError, match="distill.method: expected one of 'scd', 'sct', got False"):
        resolve(default_raw(), overrides=parse_overrides(["distill.method=off"]))  # only where 'off' is a choice


def test_every_value_comes_from_params_yaml():
    """The loader holds types and ranges, never a second set of values: a key missing from params.yaml is an error."""
    raw = default_raw()
    del raw["distill"]["lr"]
    with pytest.raises(StageError, match=r"^distill\.lr: missing"):
        resolve(raw)
    with pytest.raises(StageError, match=r"^base\.seed: missing"):
        resolve({})


@pytest.mark.parametrize("section, new", [("teacher", "teacher.lr_warmup_steps"), ("distill", "distill.tangent_warmup_steps")])
def test_the_old_warmup_key_names_the_new_one(section, new):
    with pytest.raises(StageError, match=rf"^{section}\.warmup_steps: renamed to {new}"):
        resolve(default_raw(), overrides={section: {"warmup_steps": 10}})
    raw = default_raw()
    raw["profiles"]["smoke"][section]["warmup_steps"] = 3
    with pytest.raises(StageError, match=rf"^profiles\.smoke\.{section}\.warmup_steps: renamed to {new}"):
        resolve(raw)


def test_both_training_stages_have_a_configurable_learning_rate_warmup():
    p = resolve(default_raw(), overrides={"teacher": {"lr_warmup_steps": 7}, "distill": {"lr_warmup_steps": 9}})
    assert (p.teacher.lr_warmup_steps, p.distill.lr_warmup_steps, p.distill.tangent_warmup_steps) == (7, 9, 1000)
