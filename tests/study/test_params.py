"""study/params.py: the project's params.yaml resolves under every profile; the training-reliability keys are
typed and range-checked; a bare YAML `off` is read as the string it was meant to be."""

from __future__ import annotations

import pytest

from study.errors import StageError
from study.files import REPO_ROOT
from study.params import load, parse_overrides, resolve
from helpers import default_raw


@pytest.mark.parametrize("profile", ["default", "smoke", "cifar10-gpu", "imagenet64-gpu", "imagenet512-gpu"])
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
    for value in ("on", "off"):
        assert resolve(default_raw(), overrides=parse_overrides([f"evaluate.inception={value}"])).evaluate.inception == value
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


# --------------------------------------------------------------------------------------------------------------
# What the loader used to accept silently, and cross-section checks at load time.


def _write(tmp_path, text: str):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_a_repeated_key_is_refused_as_dvc_refuses_it(tmp_path):
    text = (REPO_ROOT / "params.yaml").read_text().replace("  lr: 0.001\n", "  lr: 0.001\n  lr: 0.5\n", 1)
    with pytest.raises(StageError, match=r"params.yaml: not valid YAML \(duplicate key 'lr' at line \d+\)$"):
        load(_write(tmp_path, text))


def test_exponent_floats_are_floats_in_the_file_and_in_overrides(tmp_path):
    text = (REPO_ROOT / "params.yaml").read_text().replace("  lr: 0.0001 ", "  lr: 1e-4 ", 1)
    assert "lr: 1e-4" in text
    assert load(_write(tmp_path, text)).distill.lr == 1e-4
    assert load(REPO_ROOT / "params.yaml", overrides=["distill.lr=2e-4", "teacher.lr=1E-3"]).distill.lr == 2e-4
    from pipeline.cli import parse_grid

    assert parse_grid(["distill.lr=[1e-4, 2e-4]"]) == {"distill.lr": [1e-4, 2e-4]}  # the example sweep --help prints
    assert parse_grid(["distill.lr=1e-4,2e-4"]) == {"distill.lr": [1e-4, 2e-4]}


def test_an_empty_params_file_is_refused(tmp_path):
    with pytest.raises(StageError, match=r"params.yaml: empty"):
        load(_write(tmp_path, "# nothing\n"))


def test_a_profile_named_default_is_refused():
    raw = default_raw()
    raw["profiles"]["default"] = {"teacher": {"steps": 5}}
    with pytest.raises(StageError, match=r"^profiles.default: 'default' names the top-level sections"):
        resolve(raw)


@pytest.mark.parametrize("scales, named", [
    ([], "base.scales: expected at least one scale"),
    (["cpu-xs", "cpu-s", "cpu-xs"], "base.scales: scale 'cpu-xs' is listed twice"),
    (["cpu-xxs"], "base.scales: unknown scale 'cpu-xxs' (accepted: cpu-xs, cpu-s"),
])
def test_scales_are_checked_at_load(scales, named):
    with pytest.raises(StageError) as e:
        resolve(default_raw(), overrides={"base": {"scales": scales}})
    assert str(e.value).startswith(named)


@pytest.mark.parametrize("overrides, named", [
    ({"base": {"sigma_data": 50.0}}, "sample.t_mid: expected a value < t_max = arctan(80/base.sigma_data) = 1.0122"),
    ({"evaluate": {"kid_subset_size": 1001}}, "evaluate.kid_subset_size: expected a value <= sample.num_samples = 1000"),
    ({"base": {"seed": 2**64}}, "base.seed: expected a value >= 0 and <= 4611686018427387904"),
])
def test_checks_across_sections_come_at_load_not_in_a_late_stage(overrides, named):
    with pytest.raises(StageError) as e:
        resolve(default_raw(), overrides=overrides)
    assert str(e.value).startswith(named), str(e.value)


def test_an_unused_profile_is_checked_across_sections_too():
    raw = default_raw()
    raw["profiles"]["smoke"]["base"]["sigma_data"] = 50.0  # valid alone; t_mid = 1.1 is then beyond t_max
    with pytest.raises(StageError, match=r"^profiles.smoke: sample.t_mid: expected a value < t_max"):
        resolve(raw)


@pytest.mark.parametrize("override, named", [
    ("=5", "override '=5': expected a dotted key before '='"),
    ("distill.=5", "override 'distill.=5': expected a dotted key before '='"),
    ("teacher.source=''", "teacher.source: empty (expected train, a local path"),
])
def test_errors_name_the_key(override, named):
    with pytest.raises(StageError) as e:
        load(REPO_ROOT / "params.yaml", overrides=[override])
    assert str(e.value).startswith(named), str(e.value)


def test_a_newline_in_an_error_cannot_forge_a_second_error_line(capsys):
    from study.cli import cli

    def main(argv):
        raise StageError("data/evil\nerror: all is well: not found")

    assert cli(main, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data/evil\\nerror: all is well")


@pytest.mark.parametrize("profile", ["cifar10-gpu", "imagenet64-gpu", "imagenet512-gpu"])
def test_the_gpu_presets_evaluate_with_the_papers_protocol(profile):
    """FID on 50,000 samples against the whole training set, the minimum over 3 seed sets, the field's Inception on
    every set (EDM, EDM2 and the sCM paper report it so); FD-DINOv2 where the paper reports it (ImageNet 512).

    The training set: CIFAR-10's official train split (its test split, the eval split here, is never trained on);
    ImageNet's training folder, all of it trained on (``base.train_split: all``) and all of it the reference."""
    p = resolve(default_raw(), profile=profile)
    assert (p.sample.num_samples, p.sample.seed_sets) == (50000, 3)
    training_set = "train" if profile == "cifar10-gpu" else "all"
    assert (p.evaluate.reference, p.base.train_split) == (training_set, training_set)
    assert (p.evaluate.headline, p.evaluate.inception, p.evaluate.detector_seed_sets) == ("min", "on", 0)
    assert p.evaluate.dinov2 == ("on" if profile == "imagenet512-gpu" else "off")
    default = resolve(default_raw())
    assert (default.evaluate.reference, default.evaluate.headline, default.evaluate.inception) == ("eval", "mean", "off")
    assert default.base.train_split == "train"  # the CPU default keeps its held-out split unseen


def _git_project(tmp_path, text: str):
    import subprocess

    (tmp_path / "params.yaml").write_text(text)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost", "PATH": "/usr/bin:/bin"}
    for args in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=tmp_path, env=env, check=True)
    return tmp_path / "params.yaml"


def test_an_edited_top_level_value_that_the_profile_shadows_stops_the_run(tmp_path):
    """What `dvc exp run -S distill.steps=8 -S profile=smoke` writes: the smoke profile's distill.steps would win
    silently, so the loader refuses, naming both keys."""
    text = (REPO_ROOT / "params.yaml").read_text()
    path = _git_project(tmp_path, text)
    assert load(path).distill.steps == 750
    path.write_text(text.replace("profile: default", "profile: smoke", 1).replace("  steps: 750 ", "  steps: 8 ", 1))
    with pytest.raises(StageError, match=r"distill.steps = 8 \(profiles.smoke.distill.steps = 6 wins\)") as e:
        load(path)
    assert "\n" not in str(e.value) and "-S profiles.smoke.<key>" in str(e.value)
    assert load(path, overrides=["distill.steps=8"]).distill.steps == 8  # a stage CLI's -S always wins
    # An edit the profile does not shadow takes effect; one equal to the profile's value is no conflict.
    path.write_text(text.replace("profile: default", "profile: smoke", 1).replace("  lr: 0.0001 ", "  lr: 0.0002 ", 1))
    assert load(path).distill.lr == 0.0002
    path.write_text(text.replace("profile: default", "profile: smoke", 1).replace("  steps: 750 ", "  steps: 6 ", 1))
    assert load(path).distill.steps == 6
    # The way the message points to: the profile's own key.
    smoke = "    distill: {steps: 6, "
    assert smoke in text
    path.write_text(text.replace("profile: default", "profile: smoke", 1).replace(smoke, "    distill: {steps: 8, ", 1))
    assert load(path).distill.steps == 8
    # The committed file's own top-level values are the default profile's, never a conflict.
    (tmp_path / "committed").mkdir()
    committed = _git_project(tmp_path / "committed", text.replace("profile: default", "profile: smoke", 1))
    assert load(committed).distill.steps == 6


def test_per_scale_values_resolve_for_each_scale_and_are_checked():
    raw = default_raw()
    p = resolve(raw, overrides=parse_overrides(["teacher.steps={cpu-xs: 10, cpu-s: 20}", "distill.dropout={cpu-xs: 0.1, cpu-s: 0.3}"]))
    assert p.teacher.steps == {"cpu-xs": 10, "cpu-s": 20}
    assert p.at("cpu-xs").teacher.steps == 10 and p.at("cpu-s").teacher.steps == 20
    assert p.at("cpu-s").distill.dropout == 0.3 and p.at("cpu-s").distill.lr == p.distill.lr  # scalars stay as they are
    for override, named in [
        ("teacher.steps={cpu-xs: 10}", "teacher.steps: no value for scale 'cpu-s' (base.scales)"),
        ("teacher.steps={cpu-xs: 10, cpu-s: 20, giant: 3}", "teacher.steps.giant: unknown scale"),
        ("teacher.steps={cpu-xs: 10, cpu-s: 0}", "teacher.steps.cpu-s: expected a value >= 1, got 0"),
        ("distill.dropout={cpu-xs: 0.1, cpu-s: 1.5}", "distill.dropout.cpu-s: expected a value >= 0.0 and < 1.0"),
        ("teacher.steps={cpu-xs: ten, cpu-s: 20}", "teacher.steps.cpu-xs: expected int, got 'ten'"),
        ("teacher.steps=ten", "teacher.steps: expected int, got 'ten'"),
        ("distill.lr=.nan", "distill.lr: expected a finite float"),
        ("teacher.batch_size={cpu-xs: 8, cpu-s: 8}", "teacher.batch_size: expected int, got"),  # not a per-scale key
    ]:
        with pytest.raises(StageError, match=named.replace("(", r"\(").replace(")", r"\)")):
            resolve(raw, overrides=parse_overrides([override]))


def test_optimiser_schedule_and_ema_keys_are_checked():
    raw = default_raw()
    for override, named in [("teacher.optimizer=sgd", "teacher.optimizer: expected one of 'adam', 'radam'"),
                            ("distill.betas=[0.9]", r"distill.betas: expected two values \(beta1, beta2\)"),
                            ("distill.betas=[0.9, 1.0]", "distill.betas: expected a value >= 0.0 and < 1.0, got 1.0"),
                            ("teacher.eps=0", "teacher.eps: expected a value > 0.0"),
                            ("teacher.lr_schedule=cosine", "teacher.lr_schedule: expected one of 'constant', 'inv_sqrt'"),
                            ("distill.ema=karras", "distill.ema: expected one of 'half_life', 'power'"),
                            ("distill.ema_std=0.3", "distill.ema_std: expected a value > 0.0 and < 0.289"),
                            ("distill.dropout_levels=[-1]", "distill.dropout_levels: expected a value >= 0")]:
        with pytest.raises(StageError, match=named):
            resolve(raw, overrides=parse_overrides([override]))


@pytest.mark.parametrize("overrides, named", [
    (["teacher.label_dropout=0.1"], "teacher.label_dropout: needs class labels (base.conditional: true)"),
    (["distill.guidance_max=2.0", "distill.method=scd"], "distill.guidance_max: classifier-free guidance needs class labels"),
    (["base.conditional=true", "distill.guidance_max=2.0"], "distill.guidance_max: sCT takes no guidance"),
    (["sample.teacher_guidance=1.4"], "sample.teacher_guidance: guidance needs class labels"),
    (["base.conditional=true", "sample.guidance_1step=1.5"],
     "sample.guidance_1step: expected a value <= distill.guidance_max = 1.0 (the student learns s in [1, guidance_max]), got 1.5"),
    (["base.conditional=true", "distill.method=scd", "distill.guidance_max=2.0",
      "sample.guidance_2step={cpu-xs: 1.2, cpu-s: 2.5}"], "sample.guidance_2step: expected a value <= distill.guidance_max = 2.0"),
    (["sample.guidance_2step=0.5"], "sample.guidance_2step: expected a value >= 1.0, got 0.5"),
    (["distill.guidance_max=0.9"], "distill.guidance_max: expected a value >= 1.0, got 0.9"),
])
def test_labels_and_guidance_settings_that_would_be_ignored_are_refused(overrides, named):
    with pytest.raises(StageError) as e:
        resolve(default_raw(), overrides=parse_overrides(overrides))
    assert str(e.value).startswith(named), str(e.value)


def test_sample_guidance_resolves_per_scale():
    p = resolve(default_raw(), overrides=parse_overrides(
        ["base.conditional=true", "distill.method=scd", "distill.guidance_max=2.0",
         "sample.guidance_1step={cpu-xs: 1.5, cpu-s: 1.3}", "sample.teacher_guidance={cpu-xs: 1.4, cpu-s: 1.2}"]))
    assert p.at("cpu-xs").sample.guidance_1step == 1.5 and p.at("cpu-s").sample.guidance_1step == 1.3
    assert p.at("cpu-s").sample.teacher_guidance == 1.2 and p.at("cpu-s").sample.guidance_2step == 1.0
