"""``teacher.source: models:/<name>/<version>``: a teacher file registered in a real SQLite MLflow store comes back
through ``study.fetch.fetch`` (as the teacher stage calls it), with its sha256 checked."""

from __future__ import annotations

import hashlib

import pytest
from mlflow import MlflowClient


def test_fetch_retrieves_a_registered_teacher_from_a_sqlite_store(tmp_path, monkeypatch):
    from study.errors import StageError
    from study.fetch import fetch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("teachers", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = c.create_run(exp, run_name="teacher-cpu-xs")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not really safetensors, but fetch only moves bytes" * 100)
    c.log_artifact(run.info.run_id, str(weights), "teacher")
    c.set_terminated(run.info.run_id)
    c.create_registered_model("scm-teacher-cpu-xs")
    version = c.create_model_version("scm-teacher-cpu-xs", source=f"runs:/{run.info.run_id}/teacher", run_id=run.info.run_id)
    assert str(version.version) == "1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the stage reads the store from the environment
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    got = fetch("models:/scm-teacher-cpu-xs/1", sha, tmp_path / "dest" / "model.safetensors")
    assert got == tmp_path / "dest" / "model.safetensors" and got.read_bytes() == weights.read_bytes()

    with pytest.raises(StageError, match="models:/scm-teacher-cpu-xs/2"):
        fetch("models:/scm-teacher-cpu-xs/2", "", tmp_path / "missing.safetensors")
