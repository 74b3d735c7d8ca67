"""Scale-out with a work pool, on one machine: a process-type pool, ``python -m pipeline deploy`` from a git
repository, and ``prefect worker start``. The worker's flow run clones the repository into its own directory (as a
worker on another machine would), pulls every output from the shared DVC remote instead of recomputing it, and logs
to the shared MLflow store."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import ROOT, logs, prefect_env, run, sh, task_runs, wait_for_flow_run

pytestmark = pytest.mark.slow
POOL = "scm-test-pool"


@pytest.fixture
def origin(reproduced, tmp_path) -> Path:
    """The reproduced project as a 'central' git repository whose outputs are in a DVC remote."""
    project = tmp_path / "origin"
    shutil.copytree(reproduced.project, project, symlinks=True, ignore=shutil.ignore_patterns(".sweeps", "mlflow.db", "mlartifacts"))
    with open(project / ".gitignore", "a") as f:
        f.write("/mlflow.db\n/mlartifacts/\n/.sweeps/\n")
    run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], project)
    run([sys.executable, "-m", "dvc", "push", "--run-cache"], project)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results of the smoke reproduction"], project)
    return project


def test_a_worker_runs_the_deployed_flow_from_git_with_a_shared_dvc_remote(prefect_api, origin, tmp_path):
    from prefect.deployments import run_deployment

    env = prefect_env(prefect_api)
    shared_mlflow = f"sqlite:///{tmp_path / 'shared-mlflow.db'}"  # stands in for an MLflow server
    sh([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"], ROOT, env=env)
    out = sh([sys.executable, "-m", "pipeline", "deploy", "--pool", POOL, "--source", str(origin), "--project",
               str(origin), "--profile", "smoke", "--pull", "--name", "remote", "--env",
               f"MLFLOW_TRACKING_URI={shared_mlflow}"], ROOT, env=env, timeout=300)
    assert "deployed reproduce/remote" in out

    flow_run = run_deployment("reproduce/remote", timeout=0)
    workdir = tmp_path / "worker"
    workdir.mkdir()
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1"],
                              cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        final = wait_for_flow_run(flow_run.id, timeout=420, poll=2)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            output = worker.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]
    assert final.state.is_completed(), f"{final.state.message}\n{output[-5000:]}"

    runs = task_runs(flow_run.id)
    assert {"data", "teacher-cpu-xs", "evaluate-cpu-s", "report", "compare-scales"} <= set(runs)
    assert all(r.state.is_completed() for r in runs.values())
    messages = logs(flow_run_id=flow_run.id, expect="report: skipped")
    assert any("Pulling data for stage: 'teacher@cpu-s'" in m for m in messages)
    assert not any(m.startswith("Running stage") for m in messages)  # nothing recomputed: all from the remote

    c = MlflowClient(shared_mlflow)
    (parent,) = c.search_runs([c.get_experiment_by_name("scm-smoke").experiment_id], "tags.`scm.kind` = 'reproduction'")
    clone = Path(parent.data.tags["scm.project"])
    assert clone != origin and not clone.is_relative_to(origin)  # the worker's own clone
    for child in c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"):
        scale = child.data.params["scale"]
        expected = json.loads((origin / "metrics" / scale / "evaluate.json").read_text())["fid_clf_scm2"]
        assert child.data.metrics["eval/fid_clf/2step"] == pytest.approx(expected)
