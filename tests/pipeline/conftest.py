"""Fixtures of the flow tests: one real Prefect server for the session, one real reproduction shared by the suite.

Prefect keeps its state in a temporary ``PREFECT_HOME`` and a temporary server (``prefect_test_harness``); MLflow
writes to SQLite inside the temporary project (the flows' default); nothing is mocked.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Before anything imports Prefect: its home in a temporary directory, never a shared server or tracking store.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
for _key in ("PREFECT_API_URL", "PREFECT_PROFILE", "MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME"):
    os.environ.pop(_key, None)
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: helpers
from helpers import make_project  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_api() -> str:
    """A real Prefect API server (subprocess, fresh SQLite database) for the whole session; its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@dataclass
class Reproduction:
    project: Path
    state: Any
    seconds: float

    @property
    def flow_run_id(self):
        return self.state.state_details.flow_run_id

    @property
    def result(self) -> dict[str, Any]:
        return self.state.result()

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.project / 'mlflow.db'}"


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, prefect_api) -> Reproduction:
    """The ``reproduce`` flow on the smoke profile in a fresh temporary project (every stage runs)."""
    from pipeline.flows import reproduce

    project = make_project(tmp_path_factory.mktemp("reproduce"))
    start = time.perf_counter()
    state = reproduce(profile="smoke", project=str(project), register_models=True, return_state=True)
    seconds = time.perf_counter() - start
    print(f"\nreproduce (smoke, fresh project): {seconds:.0f} s")
    assert state.is_completed(), state.message
    return Reproduction(project, state, seconds)
