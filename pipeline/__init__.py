"""Prefect flows over the DVC pipeline, recorded in MLflow (``python -m pipeline --help``).

``pipeline.flows`` holds the flows (``reproduce``, ``sweep``), ``pipeline.project`` the DVC side (params, stage order,
``dvc repro`` subprocesses, isolated copies), ``pipeline.tracking`` the MLflow record, ``pipeline.cli`` the command line.
Importing this package starts nothing; it only makes sure no telemetry leaves the machine.
"""

import os

# No telemetry and no update checks, in this process and in every subprocess it starts.
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)
