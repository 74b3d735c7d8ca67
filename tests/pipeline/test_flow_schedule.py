"""``python -m pipeline serve --cron ...`` against a real Prefect server: both deployments appear with the cron
schedule and the profile/overrides parameters, and the serving process executes a run of the deployment (here one
with a bad profile, which fails in ``configure`` before any stage runs)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, make_project, prefect_env, wait_for_flow_run

pytestmark = pytest.mark.slow
CRON = "0 2 * * *"


def read_deployment(name: str, timeout: float, proc: subprocess.Popen):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                if proc.poll() is not None:
                    raise AssertionError(f"serve exited with {proc.returncode}:\n{proc.stdout.read()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"deployment {name} did not appear within {timeout} s")
                time.sleep(1)


def test_serve_creates_scheduled_deployments_and_runs_them(prefect_api, tmp_path):
    from prefect.deployments import run_deployment

    project = make_project(tmp_path / "project")
    cmd = [sys.executable, "-m", "pipeline", "serve", "--cron", CRON, "--profile", "smoke", "-S", "distill.steps=4",
           "--project", str(project), "--name", "nightly"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=prefect_env(prefect_api), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deployment = read_deployment("reproduce/nightly", 120, proc)
        assert [s.schedule.cron for s in deployment.schedules] == [CRON]
        assert deployment.parameters == {"profile": "smoke", "overrides": ["distill.steps=4"], "project": str(project)}
        assert {"profile", "overrides"} <= set(deployment.parameter_openapi_schema["properties"])
        sweep = read_deployment("sweep/nightly-sweep", 30, proc)
        assert sweep.parameters["scales"] == ["cpu-xs", "cpu-s"] and sweep.parameters["profile"] == "smoke"

        # The served process runs the deployment's flow (parameters overridden per run, as from the UI).
        flow_run = run_deployment("reproduce/nightly", parameters={"profile": "nope"}, timeout=0)
        final = wait_for_flow_run(flow_run.id, timeout=180)
        assert final.state.is_failed() and "unknown profile 'nope'" in final.state.message, final.state.message
        assert not (project / "data").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_without_a_persistent_api_and_validates_first(tmp_path):
    project = make_project(tmp_path / "project")
    env = prefect_env("")
    env.pop("PREFECT_API_URL")
    res = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--cron", CRON, "--project", str(project)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "prefect server start" in res.stderr and "PREFECT_API_URL" in res.stderr
    res = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--cron", CRON, "--project", str(project),
                          "--profile", "nope"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error: profile: unknown profile 'nope'" in res.stderr
