"""The ``reproduce`` flow on the smoke profile, against a real Prefect server, real DVC and a real MLflow SQLite store:
every task completes in a state that says what DVC did, the task graph is DVC's, stage logs reach the UI, artifacts
are published, DVC is left clean, MLflow holds the record (real run times, namespaced metrics, dataset inputs, the
student as an MLflow model with a signature) and the registered students; a second reproduction runs nothing and
still records everything; bad input fails before any stage runs and leaves params.yaml as it was; a failing stage
fails its task with the stage's own error line, once, without a traceback."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import artifacts, logs, make_project, task_runs

pytestmark = pytest.mark.slow
SCALES = ("cpu-xs", "cpu-s")
STAGE_TASKS = ["data", "encode", "classifier", *(f"{s}-{x}" for x in SCALES for s in ("teacher", "distill", "sample", "evaluate")),
               "report"]


def dvc(project: Path, *args: str) -> str:
    from pipeline.project import subprocess_env

    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True,
                         env=subprocess_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout + res.stderr


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def children(uri: str, parent_run_id: str):
    c = mlflow_client(uri)
    parent = c.get_run(parent_run_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.params["scale"]: r for r in runs}


# --------------------------------------------------------------------------------------------------------------
# One reproduction, many checks.


def test_every_stage_and_scale_ran_as_a_completed_task(reproduced):
    runs = task_runs(reproduced.flow_run_id)
    assert set(STAGE_TASKS) <= set(runs), sorted(runs)
    assert {name: r.state.type.value for name, r in runs.items() if not r.state.is_completed()} == {}
    assert {"configure", "mlflow-open", "mlflow-cpu-xs", "mlflow-cpu-s", "compare-scales", "publish-report"} <= set(runs)
    outcomes = {s["stage"]: s["outcome"] for s in reproduced.result["stages"]}
    assert list(outcomes) == ["data", "encode", "classifier", *(f"{s}@{x}" for x in SCALES for s in
                              ("teacher", "distill", "sample", "evaluate")), "report"]  # dependency order, scale by scale
    assert set(outcomes.values()) == {"ran"}  # a fresh project: DVC ran every stage
    assert {runs[name].state.name for name in STAGE_TASKS} == {"Ran"}  # the state says what DVC did
    assert runs["teacher-cpu-s"].tags == ["profile:smoke", "scale:cpu-s", "stage:teacher"] or \
        sorted(runs["teacher-cpu-s"].tags) == ["profile:smoke", "scale:cpu-s", "stage:teacher"]


def test_the_task_graph_is_dvcs_stage_graph(reproduced):
    """Stage tasks wait for the stages DVC says they depend on, and take no data from the bookkeeping tasks."""
    runs = task_runs(reproduced.flow_run_id)
    by_id = {str(r.id): name for name, r in runs.items()}

    def upstream(name: str) -> set[str]:
        inputs = runs[name].task_inputs
        return {by_id.get(str(i.id), "?") for values in inputs.values() for i in values if hasattr(i, "id")}

    assert upstream("data") == set()
    assert upstream("encode") == {"data"} and upstream("classifier") == {"data"}
    assert upstream("teacher-cpu-s") == {"encode"}
    assert upstream("distill-cpu-s") == {"encode", "teacher-cpu-s"}
    assert upstream("evaluate-cpu-xs") == {"data", "encode", "classifier", "teacher-cpu-xs", "distill-cpu-xs",
                                           "sample-cpu-xs"}
    assert upstream("report") == {"data", "encode", "classifier", *(f"{s}-{x}" for s in ("teacher", "distill", "sample", "evaluate")
                                                      for x in SCALES)}
    assert not any(upstream(name) & {"configure", "mlflow-open"} for name in STAGE_TASKS)


def test_stage_output_is_streamed_into_the_task_log(reproduced):
    runs = task_runs(reproduced.flow_run_id)
    messages = logs(task_run_id=runs["teacher-cpu-s"].id, expect="Running stage 'teacher@cpu-s'")
    assert any("Running stage 'teacher@cpu-s'" in m for m in messages), messages[:20]
    assert any("python -m stages.teacher --scale cpu-s" in m for m in messages)
    assert any("teacher@cpu-s: ran in" in m for m in messages)
    assert "stage 8 of 12: teacher@cpu-s" in messages  # the stage counter


def test_results_are_published_as_prefect_artifacts(reproduced):
    found = artifacts(reproduced.flow_run_id)
    assert {"summary-smoke", "report-smoke", "scaling-smoke", "mlflow-smoke"} <= set(found), sorted(found)
    summary = json.loads(found["summary-smoke"].data)
    assert [row["scale"] for row in summary] == list(SCALES) and summary[0]["fid_clf 2-step"] > 0
    assert all(len(str(v)) <= 12 for row in summary for v in row.values())  # rounded, short
    assert summary[0]["ratio 2-step"].endswith(("✓", "✗"))
    scaling = json.loads(found["scaling-smoke"].data)
    assert [row["scale"] for row in scaling] == list(SCALES)  # sorted by parameter count
    assert scaling[0]["n_params"] < scaling[1]["n_params"] and all(row["fid_clf_scm2"] > 0 for row in scaling)
    report = found["report-smoke"].data
    assert report.startswith("# ") and report.count("](data:image/png;base64,") >= 5  # images embedded
    assert "file://" not in report
    assert f"mlflow ui --backend-store-uri {reproduced.tracking_uri}" in found["mlflow-smoke"].data
    assert reproduced.result["run_id"] in found["mlflow-smoke"].data
    assert any(key.startswith("progress-teacher-cpu") for key in found)
    progress = next(a for key, a in found.items() if key.startswith("progress-distill-cpu-s"))
    assert progress.type == "progress" and float(progress.data) == 100.0


def test_dvc_is_clean_afterwards_and_a_further_repro_does_nothing(reproduced):
    assert "Data and pipelines are up to date" in dvc(reproduced.project, "status")
    assert "Running stage" not in dvc(reproduced.project, "repro")


def test_mlflow_holds_a_parent_run_with_one_child_per_scale(reproduced):
    result, uri = reproduced.result, reproduced.tracking_uri
    assert result["tracking_uri"] == uri and uri.startswith("sqlite:////")
    assert not (reproduced.project / "mlruns").exists()
    c = mlflow_client(uri)
    parent = c.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["profile"] == "smoke"
    assert re.fullmatch(r"smoke-[0-9a-f]{7}(-dirty)?-\d{8}-\d{6}", parent.info.run_name), parent.info.run_name
    assert "profile `smoke`" in parent.data.tags["mlflow.note.content"] and parent.data.tags["mlflow.user"]
    assert parent.data.metrics["cpu-s/eval/fid_clf/2step"] > 0  # the headline numbers on the parent
    assert c.get_experiment(parent.info.experiment_id).name == "scm-smoke"
    assert c.get_experiment(parent.info.experiment_id).artifact_location == (reproduced.project / "mlartifacts").as_uri()
    parent_files = {f.path for d in ("report", "scaling", "lineage") for f in c.list_artifacts(parent.info.run_id, d)}
    assert {"report/report.md", "report/summary.json", "scaling/fid_vs_params.png", "lineage/dvc.lock"} <= parent_files

    runs = children(uri, result["run_id"])
    assert sorted(runs) == sorted(SCALES)
    tasks = task_runs(reproduced.flow_run_id)
    for scale, run in runs.items():
        evaluation = json.loads((reproduced.project / "metrics" / scale / "evaluate.json").read_text())
        m, p, tags = run.data.metrics, run.data.params, run.data.tags
        names = {"eval/fid_clf/2step": "fid_clf_scm2", "eval/fid_clf/1step": "fid_clf_scm1",
                 "eval/fid_clf/teacher": "fid_clf_teacher", "eval/kid_clf_mean/2step": "kid_clf_mean_scm2",
                 "eval/precision_clf/2step": "precision_clf_scm2", "eval/recall_clf/2step": "recall_clf_scm2",
                 "eval/ratio_clf2/1step": "fid_clf2_ratio_scm1", "speed/sec_per_image/2step": "sec_per_image_scm2",
                 "speed/speedup/2step": "speedup_scm2"}
        for name, key in names.items():
            assert m[name] == pytest.approx(evaluation[key]), name
        assert not any(k.startswith(("nfe", "n_params", "teacher.", "distill.")) for k in m)  # configuration: params only
        assert all("/" in k for k in m), sorted(k for k in m if "/" not in k)  # namespaced
        # The run spans its stages: opened before the teacher task started, closed after evaluate ended.
        teacher, evaluate = tasks[f"teacher-{scale}"], tasks[f"evaluate-{scale}"]
        assert run.info.start_time <= teacher.start_time.timestamp() * 1000 + 1
        assert run.info.end_time >= evaluate.end_time.timestamp() * 1000 - 1
        assert m["time/teacher_s"] > 0 and m["memory/teacher_peak_mib"] > 50 and tags["dvc.outcome.teacher"] == "ran"
        assert any(k.startswith("system/") for k in m), sorted(m)  # MLflow's system metrics while it ran
        datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
        assert set(datasets) == {"mnist5k (prepared images)", "mnist5k (latents)"} and all(datasets.values())
        assert int(p["n_params"]) > 0 and p["nfe_teacher"] == "5" and p["nfe_scm1"] == "1"
        assert p["distill.steps"] == "6" and p["teacher.steps"] == "20" and p["profile"] == "smoke"  # resolved smoke values
        assert p["base.scales"] == json.dumps(list(SCALES))
        assert tags["dvc.stages"] == ",".join(f"{s}@{scale}" for s in ("teacher", "distill", "sample", "evaluate"))
        assert tags["git.commit"] not in ("", "unknown") and len(tags["dvc.md5.distill"]) >= 32
        # Per-step training curves, with the CSV's steps.
        with open(reproduced.project / "plots" / scale / "distill_history.csv") as f:
            rows = list(csv.DictReader(f))
        history = c.get_metric_history(run.info.run_id, "train/distill/loss")
        assert [h.step for h in history] == [int(r["step"]) for r in rows]
        assert [h.value for h in history] == pytest.approx([float(r["loss"]) for r in rows])
        assert [h.timestamp for h in history] == [int(1000 * float(r["time"])) for r in rows]  # when each was logged
        assert len({h.timestamp for h in history}) > 1
        for key in ("train/teacher/loss", "train/teacher/grad_norm", "train/teacher/lr", "train/teacher/images_per_s",
                    "train/distill/g_norm"):
            assert c.get_metric_history(run.info.run_id, key), key
        files = {f.path for d in ("samples", "config", "student", "report") for f in c.list_artifacts(run.info.run_id, d)}
        assert {"samples/grid_scm2.png", "samples/grid_teacher.png", "config/resolved_params.yaml",
                "student/MLmodel", "report/report.md"} <= files


def test_the_student_is_an_mlflow_model_that_turns_seeds_into_the_sample_stages_images(reproduced, monkeypatch):
    import mlflow
    import pandas as pd
    from safetensors.torch import load_file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", reproduced.tracking_uri)  # models:/ resolves against this registry
    model = mlflow.pyfunc.load_model("models:/scm-smoke-cpu-xs-student@current")
    assert model.metadata.signature.inputs.input_names() == ["seed"]
    assert model.metadata.signature.params.to_dict()[0]["name"] == "num_inference_steps"
    images = model.predict(pd.DataFrame({"seed": [0, 1, 2]}), params={"num_inference_steps": 2})
    samples = load_file(reproduced.project / "artifacts/cpu-xs/samples/samples.safetensors")
    expected = samples["scm2_s0"][:3].permute(0, 2, 3, 1).numpy()  # seed set 0: seeds 0, 1, 2, ...
    assert images.shape == expected.shape and images.dtype == expected.dtype
    assert abs(images.astype(int) - expected.astype(int)).max() <= 1  # the decoder's float sums depend on the batch


def test_each_student_is_registered_and_fetchable_as_models_uri(reproduced, tmp_path, monkeypatch):
    from study.fetch import fetch

    c = mlflow_client(reproduced.tracking_uri)
    runs = children(reproduced.tracking_uri, reproduced.result["run_id"])
    for scale in SCALES:
        (version,) = c.search_model_versions(f"name = 'scm-smoke-{scale}-student'")
        assert version.run_id == runs[scale].info.run_id and version.source == f"runs:/{version.run_id}/student"
        assert float(version.tags["fid_clf_scm2"]) == pytest.approx(runs[scale].data.metrics["eval/fid_clf/2step"], rel=1e-5)
        assert c.get_model_version_by_alias(f"scm-smoke-{scale}-student", "current").version == version.version
        assert "fid_clf 1-step" in version.description
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reproduced.tracking_uri)  # as the teacher stage sees it under the flow
    got = fetch("models:/scm-smoke-cpu-xs-student/1", "", tmp_path / "student.safetensors")
    assert got.read_bytes() == (reproduced.project / "artifacts/cpu-xs/distill/model.safetensors").read_bytes()


def test_a_second_reproduction_runs_nothing_and_records_everything_again(reproduced):
    from pipeline.flows import reproduce

    state = reproduce(profile="smoke", project=str(reproduced.project), register_models=True, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert {s["outcome"] for s in result["stages"]} == {"skipped"}  # DVC: everything up to date
    assert {r.state.name for name, r in task_runs(state.state_details.flow_run_id).items()
            if name in STAGE_TASKS} == {"Skipped"}
    assert result["run_id"] != reproduced.result["run_id"]
    first, second = (children(reproduced.tracking_uri, r["run_id"]) for r in (reproduced.result, result))
    for scale in SCALES:  # the metrics come from DVC-tracked files, so a skipped stage loses nothing
        assert second[scale].data.metrics["eval/fid_clf/2step"] == first[scale].data.metrics["eval/fid_clf/2step"]
    # Same weights (same DVC md5): the registered version is reused, not duplicated.
    c = mlflow_client(reproduced.tracking_uri)
    assert len(c.search_model_versions("name = 'scm-smoke-cpu-s-student'")) == 1
    assert "Data and pipelines are up to date" in dvc(reproduced.project, "status")


def test_the_command_line_reproduces_and_prints_the_table(reproduced, capsys):
    from pipeline.cli import main

    assert main(["reproduce", "--project", str(reproduced.project), "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "reproduce: completed" in out and f"report   {reproduced.project}/reports/smoke/report.md" in out
    assert f"mlflow ui --backend-store-uri {reproduced.tracking_uri}" in out and "  Prefect  " in out
    assert "params.yaml now selects profile 'smoke'" in out
    assert "scale  n_params" in out and "\ncpu-xs  " in out and "\ncpu-s  " in out
    c = mlflow_client(reproduced.tracking_uri)
    assert len(c.search_model_versions("name = 'scm-smoke-cpu-s-student'")) == 1  # smoke: nothing new registered


# --------------------------------------------------------------------------------------------------------------
# Failures.


@pytest.fixture(scope="module")
def fresh_project(tmp_path_factory) -> Path:
    return make_project(tmp_path_factory.mktemp("bad-input"))


@pytest.mark.parametrize("kwargs, named", [
    ({"profile": "nope"}, "unknown profile 'nope'"),
    ({"profile": "smoke", "scales": ["cpu-xs", "cpu-xxl"]}, "unknown scale 'cpu-xxl'"),
    ({"profile": "smoke", "overrides": ["distill.stepz=3"]}, "distill.stepz: unknown key"),
    ({"profile": "smoke", "overrides": ["distill.steps=-1"]}, "distill.steps"),
])
def test_bad_input_fails_before_any_stage_runs(fresh_project, kwargs, named):
    from pipeline.flows import reproduce

    params_before = (fresh_project / "params.yaml").read_text()
    state = reproduce(project=str(fresh_project), return_state=True, **kwargs)
    assert state.is_failed() and named in state.message, state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert list(runs) == ["configure"] and runs["configure"].state.is_failed()
    assert named in runs["configure"].state.message
    assert not (fresh_project / "data").exists() and not (fresh_project / "dvc.lock").exists()
    assert (fresh_project / "params.yaml").read_text() == params_before


def test_a_flow_that_fails_before_any_stage_leaves_params_yaml_as_it_was(tmp_path):
    """configure writes the override into params.yaml, then DVC cannot read dvc.yaml: the override is taken back."""
    from pipeline.flows import reproduce

    project = make_project(tmp_path / "broken")
    (project / "dvc.yaml").write_text((project / "dvc.yaml").read_text() + "\nstages: [this is not a mapping\n")
    before = (project / "params.yaml").read_bytes()
    state = reproduce(profile="smoke", overrides=["distill.steps=7"], project=str(project), return_state=True)
    assert state.is_failed()
    assert (project / "params.yaml").read_bytes() == before
    assert not (project / "data").exists()


def test_a_failing_stage_fails_its_task_with_the_stage_error_and_keeps_earlier_outputs(reproduced, tmp_path):
    from mlflow import MlflowClient

    from pipeline.flows import reproduce

    project = tmp_path / "project"
    shutil.copytree(reproduced.project, project, symlinks=True)
    state = reproduce(profile="smoke", overrides=["teacher.source=/nonexistent"], project=str(project), return_state=True)
    assert state.is_failed()
    runs = task_runs(state.state_details.flow_run_id)
    failed = runs["teacher-cpu-xs"]
    assert failed.state.is_failed() and failed.run_count == 1  # a stage's own error is not retried
    assert "error: /nonexistent: no such model file or directory" in failed.state.message, failed.state.message
    assert "\n" not in failed.state.message and state.message == failed.state.message  # one line, the flow's too
    messages = logs(task_run_id=failed.id)
    assert not any("Traceback" in m for m in messages), messages
    assert sum("no such model file" in m for m in messages) <= 1, messages  # once: in the state, not also the log
    assert all(runs[s].state.is_completed() for s in ("configure", "data", "encode", "classifier"))
    assert not any(name.startswith(("distill", "sample", "evaluate", "report", "mlflow-cpu")) for name in runs)
    for path in ("data/prepared/images.parquet", "data/latents/latents.safetensors", "artifacts/classifier/model.safetensors"):
        assert (project / path).is_file(), path
    c = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (latest,) = c.search_runs([c.get_experiment_by_name("scm-smoke").experiment_id], "tags.`scm.kind` = 'reproduction'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert latest.info.status == "FAILED" and latest.data.tags["scm.project"] == str(project)
