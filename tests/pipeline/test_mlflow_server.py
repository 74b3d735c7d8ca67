"""A real ``mlflow server`` (SQLite backend, bound to 127.0.0.1 on a free port) as the shared store of the scale-out
setup: a run logged over HTTP reads back, and the flows' per-scale record (params, curves, artifacts, registered
student) works over HTTP as it does on SQLite, including ``models:/`` retrieval by the fetch helper."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'm.db'}", "--artifacts-destination",
                             str(root / "artifacts"), "--workers", "1"],
                            cwd=root, env=env, stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_run_logged_over_http_reads_back(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=mlflow_server)
    exp = c.create_experiment("http-roundtrip")
    run = c.create_run(exp, run_name="roundtrip", tags={"scm.scale": "cpu-xs"})
    c.log_param(run.info.run_id, "n_params", 166388)
    for step, value in enumerate((3.0, 2.0, 1.5)):
        c.log_metric(run.info.run_id, "teacher/loss", value, step=step)
    note = tmp_path / "note.txt"
    note.write_text("hello over http")
    c.log_artifact(run.info.run_id, str(note), "notes")
    c.set_terminated(run.info.run_id)

    back = MlflowClient(tracking_uri=mlflow_server).get_run(run.info.run_id)
    assert back.info.status == "FINISHED" and back.data.params["n_params"] == "166388"
    assert back.data.tags["scm.scale"] == "cpu-xs" and back.data.metrics["teacher/loss"] == 1.5
    assert [m.step for m in c.get_metric_history(run.info.run_id, "teacher/loss")] == [0, 1, 2]
    local = c.download_artifacts(run.info.run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello over http"


def test_record_writes_a_finished_repro_to_the_server_and_the_registry_serves_it(mlflow_server, reproduced, tmp_path,
                                                                                  monkeypatch, capsys):
    """`python -m pipeline record` after the outputs exist: a parent, a child per scale dated by its stages, the
    students registered; all over HTTP."""
    from mlflow import MlflowClient

    from pipeline import cli, tracking
    from study.fetch import fetch

    project = reproduced.project
    assert tracking.artifact_location(mlflow_server, project) is None  # the server decides where artifacts go
    assert cli.main(["record", "--project", str(project), "--tracking-uri", mlflow_server, "--register"]) == 0
    out = capsys.readouterr().out
    assert f"{mlflow_server}/#/experiments/" in out  # a link into the server's UI

    c = MlflowClient(mlflow_server)
    parent = c.search_runs([c.get_experiment_by_name("scm-smoke").experiment_id], "tags.`scm.kind` = 'record'")[0]
    children = {r.data.params["scale"]: r for r in c.search_runs([parent.info.experiment_id],
                                                                 f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert sorted(children) == ["cpu-s", "cpu-xs"] and parent.data.metrics["cpu-xs/eval/fid_clf/2step"] > 0
    child = children["cpu-xs"]
    assert child.data.params["distill.steps"] == "6" and c.get_metric_history(child.info.run_id, "train/distill/loss")
    history = c.get_metric_history(child.info.run_id, "train/teacher/loss")
    assert child.info.start_time <= min(h.timestamp for h in history) + 1  # dated by when the stages ran,
    assert child.info.end_time < parent.info.start_time  # not by when the record was written
    table = tracking.scaling_table(mlflow_server, parent.info.experiment_id,
                                   f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert list(table["scale"]) == ["cpu-xs", "cpu-s"] and table["n_params"].dtype.kind == "i"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    got = fetch(f"models:/{tracking.model_name('smoke', 'cpu-xs')}@current", "", tmp_path / "m.safetensors")
    assert got.read_bytes() == (project / "artifacts/cpu-xs/distill/model.safetensors").read_bytes()


def test_record_refuses_outputs_that_differ_from_dvc_lock(reproduced, tmp_path, capsys):
    import shutil

    from pipeline import cli

    project = tmp_path / "project"
    shutil.copytree(reproduced.project, project, symlinks=True)
    (project / "metrics/cpu-xs/distill.json").write_text("{}")
    assert cli.main(["record", "--project", str(project)]) == 2
    assert "not up to date" in capsys.readouterr().err
