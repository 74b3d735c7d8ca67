"""The ``sweep`` flow: points run in parallel, each in its own copy of the project (never touching the project or
each other), unchanged stages restored from the shared DVC run cache, everything under one MLflow parent run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import artifacts, task_runs

pytestmark = pytest.mark.slow
TITLES = ("sweep point A", "sweep point B")


@pytest.fixture(scope="module")
def swept(reproduced):
    from pipeline.flows import sweep

    before = {p: (reproduced.project / p).read_text() for p in ("params.yaml", "reports/smoke/report.md", "dvc.lock")}
    # report.title only changes the report stage: every other stage is restored from the run cache.
    state = sweep(project=str(reproduced.project), profile="smoke", grid={"report.title": list(TITLES)}, concurrency=2,
                  return_state=True)
    assert state.is_completed(), state.message
    return state, before


def test_points_ran_in_parallel_as_completed_tasks(swept):
    state, _ = swept
    runs = task_runs(state.state_details.flow_run_id)
    points = [r for name, r in runs.items() if name.startswith("point-")]
    assert sorted(r.name for r in points) == ["point-report-title-sweep-point-a", "point-report-title-sweep-point-b"]
    assert all(r.state.is_completed() for r in runs.values())
    a, b = points
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the two points overlapped (concurrency 2)


def test_each_point_has_its_own_copy_and_the_project_is_untouched(swept, reproduced):
    state, before = swept
    result = state.result()
    copies = {label: r["project"] for label, r in result["points"].items()}
    assert len(set(copies.values())) == 2
    for title in TITLES:
        copy = copies[f"report.title={title}"]
        assert copy.startswith(str(reproduced.project / ".sweeps"))
        assert (Path(copy) / "reports/smoke/report.md").read_text().startswith(f"# {title}")
        outcomes = {s["stage"]: s["outcome"] for s in result["points"][f"report.title={title}"]["stages"]}
        assert outcomes.pop("report") == "ran"
        assert set(outcomes.values()) == {"restored"}, outcomes  # shared run cache: nothing recomputed
    for path, text in before.items():
        assert (reproduced.project / path).read_text() == text, path


def test_all_points_land_under_one_mlflow_parent_run(swept, reproduced):
    state, _ = swept
    result = state.result()
    c = MlflowClient(result["tracking_uri"])
    assert result["tracking_uri"] == reproduced.tracking_uri  # the project's store, not the copies'
    parent = c.get_run(result["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["scm.kind"] == "sweep"
    exp = [parent.info.experiment_id]
    points = c.search_runs(exp, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(p.data.tags["scm.point"] for p in points) == [f"report.title={t}" for t in TITLES]
    scales = c.search_runs(exp, f"tags.`scm.sweep_run_id` = '{parent.info.run_id}'")
    assert len(scales) == 4 and {r.data.tags["mlflow.parentRunId"] for r in scales} == {p.info.run_id for p in points}
    assert {r.data.params["report.title"] for r in scales} == set(TITLES)
    assert {f.path for f in c.list_artifacts(parent.info.run_id, "scaling")} == {"scaling/fid_vs_params.png"}
    table = json.loads(artifacts(state.state_details.flow_run_id)["sweep-smoke"].data)
    assert len(table) == 4 and {row["report.title"] for row in table} == set(TITLES)
    assert all(row["fid_clf_scm2"] > 0 for row in table)


def test_a_bad_point_fails_the_sweep_before_anything_is_copied(reproduced):
    from pipeline.flows import sweep

    sweeps = reproduced.project / ".sweeps"
    existing = sorted(sweeps.iterdir()) if sweeps.exists() else []
    state = sweep(project=str(reproduced.project), profile="smoke", grid={"distill.steps": [4, 0]}, return_state=True)
    assert state.is_failed() and "distill.steps" in state.message, state.message
    assert (sorted(sweeps.iterdir()) if sweeps.exists() else []) == existing
