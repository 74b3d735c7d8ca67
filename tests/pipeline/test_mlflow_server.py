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


def test_the_flow_record_and_registry_work_against_the_server(mlflow_server, reproduced, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline import tracking
    from study.params import load
    from study.fetch import fetch

    project = reproduced.project
    assert tracking.artifact_location(mlflow_server, project) is None  # the server decides where artifacts go
    record = tracking.open_parent(mlflow_server, project, "smoke", run_name="over-http", params={"profile": "smoke"}, tags={})
    stages = [s["stage"] for s in reproduced.result["stages"]]
    summary = tracking.log_scale(record, project, "cpu-xs", load(project / "params.yaml").to_dict(), stages=stages)
    tracking.close(record, "FINISHED")

    c = MlflowClient(mlflow_server)
    child = c.get_run(summary["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == record.run_id and child.data.params["distill.steps"] == "6"
    assert child.data.metrics["fid_clf_scm2"] > 0 and c.get_metric_history(summary["run_id"], "distill/loss")
    table = tracking.scaling_table(mlflow_server, record.experiment_id, f"tags.mlflow.parentRunId = '{record.run_id}'")
    assert list(table["scale"]) == ["cpu-xs"] and table["n_params"].dtype.kind == "i"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    got = fetch(f"models:/{tracking.model_name('smoke', 'cpu-xs')}/{summary['model_version']}", "", tmp_path / "m.safetensors")
    assert got.read_bytes() == (project / "artifacts/cpu-xs/distill/model.safetensors").read_bytes()


def test_credentials_in_the_tracking_uri_reach_no_prefect_record(mlflow_server, reproduced, tmp_path, monkeypatch,
                                                                    capsys):
    """`--tracking-uri http://user:password@host` against a real server: the password reaches no console line, no
    flow-run parameter or state message, no stored log and no artifact (it travels in the environment)."""
    import json
    import shutil

    from prefect.client.orchestration import get_client

    from helpers import artifacts, logs
    from pipeline import cli

    project = tmp_path / "copy"
    shutil.copytree(reproduced.project, project, symlinks=True)  # with dvc.lock and the cache: every stage skips
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    secret = "s3cret-pw-4711"
    uri = mlflow_server.replace("http://", f"http://alice:{secret}@")
    code = cli.main(["reproduce", "--profile", "smoke", "--project", str(project), "--tracking-uri", uri])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert secret not in out.out + out.err and "alice" not in out.out + out.err

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=200) if r.parameters.get("project") == str(project)]
    assert len(runs) == 1
    run = runs[0]
    assert run.parameters["tracking_uri"] == mlflow_server
    assert secret not in json.dumps(run.parameters, default=str) and secret not in (run.state.message or "")
    assert not [m for m in logs(flow_run_id=run.id) if secret in m]
    for artifact in artifacts(run.id).values():
        assert secret not in f"{artifact.description} {json.dumps(artifact.data, default=str)}", artifact.key

    # Task runs (names, inputs, states) and the server's event stream (what the UI's event feed shows).
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.events.filters import EventFilter, EventRelatedFilter

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])), limit=200)
    assert tasks, "the flow ran no task"
    for task in tasks:
        assert secret not in task.model_dump_json(), task.name
    related = EventFilter(related=EventRelatedFilter(id=[f"prefect.flow-run.{run.id}"]))
    deadline, events = time.monotonic() + 20, []
    while time.monotonic() < deadline:  # events are written asynchronously
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=related, limit=50)  # the server's maximum page
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
        if any(e.event.startswith("prefect.task-run.") for e in events):
            break
        time.sleep(0.5)
    assert events, "no event of the flow run reached the server"
    for event in events:
        assert secret not in event.model_dump_json(), event.event
