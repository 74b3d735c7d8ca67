"""The pieces of the flows without running stages: validation, params.yaml placement, stage order, log streaming,
failure classification, sweep points and the command line."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, make_project
from pipeline import cli
from pipeline import project as dvc_driver
from pipeline import tracking
from study.errors import StageError
from study.files import redact
from study.params import load


@pytest.fixture
def params_dir(tmp_path) -> Path:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("parts"))


@pytest.mark.parametrize("profile, overrides, scales, named", [
    ("nope", None, None, "profile: unknown profile 'nope'"),
    ("smoke", ["distill.stepz=3"], None, "distill.stepz: unknown key"),
    ("smoke", ["nosection.x=1"], None, "nosection: unknown section"),
    ("smoke", ["teacher.lr=-1"], None, "teacher.lr"),
    ("smoke", None, ["cpu-xs", "huge"], "base.scales: unknown scale 'huge'"),
    ("cifar10-gpu", None, None, "pass -S 'base.scales=[ddpmpp]'"),
    ("smoke", ["profile=smoke"], None, "profile: choose it with the profile parameter"),
])
def test_configure_names_the_bad_input_and_changes_nothing(params_dir, profile, overrides, scales, named):
    before = (params_dir / "params.yaml").read_text()
    with pytest.raises(StageError, match=named.replace("[", r"\[").replace("]", r"\]")):
        dvc_driver.configure(params_dir, profile, overrides, scales)
    assert (params_dir / "params.yaml").read_text() == before


def test_write_params_leaves_the_file_alone_when_nothing_changes(params_dir):
    """`make repro` selects the default profile with no overrides: params.yaml, the repository's own (with its
    multi-line preset mappings), is not rewritten."""
    before = (params_dir / "params.yaml").read_text()
    assert "\n              " in before  # a flow mapping continued on the next line, which a rewrite would re-wrap
    assert not dvc_driver.write_params(dvc_driver.configure(params_dir, "default", None, None))
    assert (params_dir / "params.yaml").read_text() == before


def test_write_params_makes_the_stages_read_exactly_the_request(params_dir):
    cfg = dvc_driver.configure(params_dir, "smoke", ["distill.steps=4", "teacher.source=/elsewhere"], ["cpu-xs"])
    assert dvc_driver.write_params(cfg)
    assert not dvc_driver.write_params(dvc_driver.configure(params_dir, "smoke", ["distill.steps=4", "teacher.source=/elsewhere"], ["cpu-xs"]))
    assert load(params_dir / "params.yaml").to_dict() == cfg.params.to_dict()  # what every stage will now read
    raw = yaml.safe_load((params_dir / "params.yaml").read_text())
    assert raw["profile"] == "smoke"
    assert raw["profiles"]["smoke"]["distill"]["steps"] == 4  # the profile sets it: a top-level value would be shadowed
    assert raw["teacher"]["source"] == "/elsewhere" and "source" not in raw["profiles"]["smoke"]["teacher"]
    assert raw["base"]["scales"] == ["cpu-xs"] == raw["profiles"]["smoke"]["base"]["scales"]  # dvc.yaml foreach
    text = (params_dir / "params.yaml").read_text()
    assert "# model scales of the per-scale stages" in text and "scales: [cpu-xs]" in text  # comments and flow style kept


def test_default_profile_overrides_go_to_the_top_level(params_dir):
    cfg = dvc_driver.configure(params_dir, "default", {"distill.steps": 700}, None)
    dvc_driver.write_params(cfg)
    raw = yaml.safe_load((params_dir / "params.yaml").read_text())
    assert raw["distill"]["steps"] == 700 and raw["profiles"]["smoke"]["distill"]["steps"] == 6


def test_stage_order_follows_dvc_and_reads_like_the_study(dvc_project):
    order = dvc_driver.stage_order(dvc_project, ("cpu-xs", "cpu-s"))
    per_scale = lambda x: [f"{s}@{x}" for s in ("teacher", "distill", "sample", "evaluate")]
    assert order == ["data", "encode", "classifier", *per_scale("cpu-xs"), *per_scale("cpu-s"), "report"]
    assert [dvc_driver.task_name(s) for s in order[3:5]] == ["teacher-cpu-xs", "distill-cpu-xs"]
    with pytest.raises(StageError, match="no stage 'teacher@cpu-m'"):
        dvc_driver.stage_order(dvc_project, ("cpu-m",))


def test_stage_graph_gives_each_stage_its_dvc_upstream(dvc_project):
    order, upstream = dvc_driver.stage_graph(dvc_project, ("cpu-xs",))
    assert upstream["data"] == [] and upstream["teacher@cpu-xs"] == ["encode"]
    assert upstream["sample@cpu-xs"] == ["distill@cpu-xs", "encode", "teacher@cpu-xs"]
    assert set(upstream) == set(order) and all(set(u) <= set(order[:order.index(n)]) for n, u in upstream.items())


def test_the_cli_refuses_to_run_outside_a_project(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no dvc.yaml here: no fallback to the installed checkout
    assert cli.main(["reproduce", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a project directory" in err and "--project" in err
    assert cli.main(["record"]) == 2 and "not a project directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_metric_names_are_namespaced_and_configuration_is_not_a_metric():
    rows = dict((k, v) for k, v, _ in tracking.evaluation_rows(
        {"scale": "cpu-s", "n_samples": 1000, "nfe_teacher": 35, "headline": "mean", "fid_clf_scm2": 3.0,
         "fid_clf_scm2_std": 0.1, "fid_clf2_ratio_scm1": 1.5, "speedup_scm2": 9.0, "clf_accuracy": 0.99,
         "inception_status": "off", "wall_seconds": 12.0}))
    assert rows == {"eval/fid_clf/2step": 3.0, "eval/fid_clf_std/2step": 0.1, "eval/ratio_clf2/1step": 1.5,
                    "speed/speedup/2step": 9.0, "eval/clf_accuracy": 0.99, "time/evaluate_s": 12.0}
    stage = dict((k, v) for k, v, _ in tracking.stage_rows("teacher", {"n_params": 5, "final_loss": 0.2,
                                                                        "train_seconds": 3.0, "scale": "cpu-s"}))
    assert stage == {"train/teacher/final_loss": 0.2, "time/teacher_train_s": 3.0}
    curve = tracking.curve_rows("distill", [{"step": 0, "kimg": 0.2, "loss": 1.0, "time": 100.5}])
    assert ("train/distill/loss", 1.0, 0, 100.5) in curve and all(r[0] != "train/distill/time" for r in curve)


def test_the_stage_watcher_reads_progress_and_peak_memory():
    from pipeline.flows import _BAR, _PEAK, _POSTFIX

    line = "distill-cpu-s:  45%|####5     | 9/20 [00:01<00:01,  6.7step/s, mse=0.1234, r=0.45, avg_img_s=900]"
    assert _BAR.search(line).groups() == ("9", "20")
    assert dict(_POSTFIX.findall(line.split("[", 1)[1])) == {"mse": "0.1234", "r": "0.45", "avg_img_s": "900"}
    assert _PEAK.match("teacher: peak memory 1048 MiB").group(1) == "1048"


def test_dvc_noise_is_dropped_and_the_push_hint_kept_only_with_a_remote():
    assert dvc_driver.NOISE.search("Use `dvc push` to send your updates to remote storage.")
    assert dvc_driver.NOISE.search("ERROR: failed to reproduce 'teacher@cpu-xs': failed to run: python -m stages")
    assert not dvc_driver.NOISE.search("Running stage 'data':")


def test_stream_logs_lines_and_thins_progress_redraws(tmp_path):
    script = ("import sys, time\n"
              "print('first line', flush=True)\n"
              "for i in range(5): sys.stderr.write(f'\\rbar {i}/4'); sys.stderr.flush()\n"
              "sys.stderr.write('\\rbar 4/4 done\\n'); sys.stderr.flush()\n"
              "print('error: the last word', file=sys.stderr)\n"
              "sys.exit(2)\n")
    seen: list[str] = []
    code, tail = dvc_driver.stream([sys.executable, "-c", script], tmp_path, dvc_driver.subprocess_env(), seen.append)
    assert code == 2 and seen[0] == "first line" and seen[-1] == "error: the last word"
    assert "bar 4/4 done" in seen and len([s for s in seen if s.startswith("bar")]) <= 2  # one redraw, then the final
    assert dvc_driver.failure_message(tail, code) == "error: the last word"


def test_failures_are_classified_for_retries():
    assert dvc_driver.failure_message(["x", "ERROR: failed to reproduce 'data': exited with 1"], 255).startswith("ERROR: failed")
    assert dvc_driver.failure_message([], 3) == "exited with 3"
    assert dvc_driver.TRANSIENT.search("ERROR: Unable to acquire lock. Most likely another DVC process is running")
    assert dvc_driver.TRANSIENT.search("ERROR: 'data/latents' is busy, it is being blocked by:\n  (PID 123): dvc repro")
    assert dvc_driver.TRANSIENT.search("failed to run: python -m stages.teacher, exited with -9")
    assert not dvc_driver.TRANSIENT.search("failed to run: python -m stages.teacher, exited with 2")


def test_retry_condition_retries_only_transient_failures():
    from prefect.states import Failed

    from pipeline.flows import _retry_transient

    transient = dvc_driver.StageFailed("data", "ERROR: Unable to acquire lock", returncode=255, transient=True)
    permanent = dvc_driver.StageFailed("teacher@cpu-xs", "error: /x: no such model", returncode=255, transient=False)
    assert _retry_transient(None, None, Failed(data=transient))
    assert not _retry_transient(None, None, Failed(data=permanent))
    assert str(permanent) == "teacher@cpu-xs: error: /x: no such model"


def test_subprocess_env_never_passes_a_run_id(monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc")
    env = dvc_driver.subprocess_env("sqlite:////tmp/x.db")
    assert "MLFLOW_RUN_ID" not in env and env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/x.db"
    assert env["DO_NOT_TRACK"] == "true" and env["PATH"].startswith(str(Path(sys.executable).parent))


def test_sweep_points_and_grid_parsing():
    from pipeline.flows import sweep_points

    grid = cli.parse_grid(["distill.steps=4,8", "base.scales=[[cpu-xs],[cpu-s]]", "distill.method=[scd, sct]"])
    assert grid == {"distill.steps": [4, 8], "base.scales": [["cpu-xs"], ["cpu-s"]], "distill.method": ["scd", "sct"]}
    points = sweep_points({"distill.steps": [4, 8]}, ["cpu-xs", "cpu-s"])
    assert [label for label, _ in points] == ["cpu-xs,distill.steps=4", "cpu-xs,distill.steps=8",
                                              "cpu-s,distill.steps=4", "cpu-s,distill.steps=8"]
    assert points[0][1] == {"base.scales": ["cpu-xs"], "distill.steps": 4}
    with pytest.raises(StageError, match="nothing to sweep"):
        sweep_points(None, None)


def test_tracking_uri_is_anchored_in_the_project(tmp_path, monkeypatch):
    from pipeline import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:////{str(tmp_path.resolve()).lstrip('/')}/mlflow.db"
    assert tracking.artifact_location(tracking.tracking_uri(tmp_path), tmp_path) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_cli_help_and_bad_input(params_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0 and "reproduce" in capsys.readouterr().out
    assert cli.main(["reproduce", "--project", str(params_dir), "--profile", "nope"]) == 2
    assert "error: profile: unknown profile 'nope'" in capsys.readouterr().err
    assert cli.main(["sweep", "--project", str(params_dir), "--profile", "smoke", "-G", "distill.steps=4,0"]) == 2
    assert "distill.steps" in capsys.readouterr().err
    assert not (params_dir / "data").exists()


@pytest.mark.parametrize("uri, shown", [
    ("https://alice:s3cret@mlflow.example.org/", "https://***@mlflow.example.org/"),
    ("http://token@10.0.0.5:5000", "http://***@10.0.0.5:5000"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("download https://u:p@host/m.safetensors failed, retry https://v:q@host/", "download https://***@host/m.safetensors failed, retry https://***@host/"),
])
def test_credentials_in_a_tracking_uri_never_reach_logs_or_results(uri, shown):
    assert redact(uri) == shown


def test_a_flow_refuses_a_stage_once_params_yaml_changed(tmp_path):
    (tmp_path / "params.yaml").write_text("profile: default\n")
    digest = dvc_driver.params_digest(tmp_path)
    dvc_driver.check_params_unchanged(tmp_path, digest, "teacher@cpu-s")
    (tmp_path / "params.yaml").write_text("profile: default\nbase: {seed: 1}\n")
    with pytest.raises(StageError, match=r"params.yaml: changed since this flow configured it; teacher@cpu-s not run"):
        dvc_driver.check_params_unchanged(tmp_path, digest, "teacher@cpu-s")


def test_one_flow_per_project(tmp_path):
    with dvc_driver.flow_lock(tmp_path):
        with pytest.raises(StageError, match=rf"another flow is running on this project \(PID {os.getpid()}\)"):
            with dvc_driver.flow_lock(tmp_path):
                pass
    with dvc_driver.flow_lock(tmp_path):  # released
        pass


def test_each_scale_is_recorded_with_the_params_its_stages_ran_with(tmp_path):
    """Not params.yaml as it is when the record is written: each stage's resolved_params.json."""
    from study import layout

    def write(output, params):
        (tmp_path / output).mkdir(parents=True, exist_ok=True)
        (tmp_path / output / layout.RESOLVED).write_text(json.dumps({"params": params}))

    base = {"seed": 0, "sigma_data": 0.5}
    write(layout.PREPARED, {"base": {"seed": 0}, "data": {"source": "mnist5k"}})
    write(layout.LATENTS, {"base": base, "encode": {"codec": "train"}, "data": "data/prepared"})
    write(layout.CLASSIFIER, {"base": base, "classifier": {"steps": 600}})
    for scale, lr in (("cpu-xs", 1e-4), ("cpu-s", 5e-4)):
        write(layout.stage_dir(scale, "teacher"), {"base": base, "teacher": {"lr": 1e-3}, "scale": scale})
        write(layout.stage_dir(scale, "distill"), {"base": base, "distill": {"lr": lr}, "teacher": "artifacts/x/teacher"})
        write(layout.stage_dir(scale, "samples"), {"base": base, "sample": {"t_mid": 1.1}})
        (tmp_path / layout.evaluation_file(scale)).write_text(json.dumps({"params": {"evaluate": {"prc": True}}}))
    write(layout.reports_dir("default"), {"base": base, "report": {"title": "t"}})
    xs, s = (tracking.scale_params(tmp_path, scale, "default") for scale in ("cpu-xs", "cpu-s"))
    assert xs["distill"]["lr"] == 1e-4 and s["distill"]["lr"] == 5e-4
    assert xs["teacher"] == {"lr": 1e-3} and xs["base"] == base and xs["data"] == {"source": "mnist5k"}
    assert xs["profile"] == "default" and "scale" not in xs
    assert xs["evaluate"] == {"prc": True} and xs["report"] == {"title": "t"}


def test_credentials_move_from_the_uri_to_the_environment(tmp_path, monkeypatch):
    from study.files import split_credentials

    assert split_credentials("https://alice:s%40cret@mlflow.example.org:5000/x") == (
        "https://mlflow.example.org:5000/x", {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s@cret"})
    assert split_credentials("sqlite:////abs/mlflow.db") == ("sqlite:////abs/mlflow.db", {})
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:hunter2@127.0.0.1:5000")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "bob" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"


def test_a_deployment_refuses_credentials_in_the_uri(capsys):
    code = cli.main(["deploy", "--pool", "p", "--source", ".", "--tracking-uri", "https://u:p@host/"])
    assert code == 2 and "would be stored in the deployment" in capsys.readouterr().err
