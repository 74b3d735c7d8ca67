"""The MLflow record of a reproduction, written from the DVC-tracked files after the stages ran.

Layout: one experiment per profile (``scm-<profile>``); a parent run per reproduction (or per sweep, with one run per
sweep point under it); a child run per scale holding

- params: the scale, its parameter count, the NFE of each sampler and every resolved hyperparameter
  (``params.yaml`` for this profile, flattened: ``teacher.lr``, ``distill.steps``, ...);
- metrics: the training curves (``plots/<scale>/{teacher,distill}_history.csv`` as ``teacher/loss``,
  ``distill/g_norm``, ... with ``step`` = the CSV's step), the evaluation (``metrics/<scale>/evaluate.json``:
  ``fid_clf_scm2``, ``kid_*``, ``precision_*``, ``sec_per_image_*``, ``speedup_*``) and the stage summaries
  (``teacher_final_loss``, ``distill_train_seconds``, ...);
- artifacts: the sample grids, the resolved configuration, the report and the student weights, registered in the
  model registry as ``scm-<profile>-<scale>-student``;
- tags: the git commit, the DVC stages and the md5 of their outputs (from ``dvc.lock``), ``DVC_EXP_NAME`` when set.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids: the active run of the fluent API is
thread-local (mlflow/mlflow#13456), and the flows log from task threads. Because the record is read from files that
DVC tracks, it exists for every reproduction, also when DVC skipped a stage or restored it from its run cache.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.project import flatten, slug
from study import layout
from study.errors import StageError
from study.files import git_commit, split_credentials
from study.models import MODEL_FILE

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_search_lock = threading.Lock()  # mlflow.search_runs reads the process-wide tracking URI (and its env variable)


# --------------------------------------------------------------------------------------------------------------
# Where the record lives.


def tracking_uri(project: Path, uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else SQLite at an absolute path in the project; without credentials.

    ``user:password@`` in the URI moves to MLFLOW_TRACKING_USERNAME/PASSWORD of this process (which the MLflow client
    and the stage subprocesses read), so the URI itself can be logged, passed and recorded.

    Never the CWD-relative ``sqlite:///mlflow.db`` or ``./mlruns`` defaults: stages, flows, workers and tests
    must agree on one store whatever their working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        uri, credentials = split_credentials(uri)  # the URI that is passed on and recorded carries none
        os.environ.update(credentials)
        return uri
    return f"sqlite:///{Path(project).resolve() / 'mlflow.db'}"  # sqlite:////abs/path: four slashes


def artifact_location(uri: str, project: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside a SQLite store, else the tracking server's choice."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        root = db.parent if db.is_absolute() else Path(project).resolve()
        return (root / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (Path(project).resolve() / "mlartifacts").as_uri()


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str, project: Path) -> str:
    """The experiment ``name``, created (with an explicit artifact location) if missing."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=artifact_location(uri, project))
    except MlflowException:  # created meanwhile by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_name(profile: str) -> str:
    return f"scm-{profile}"


@dataclass(frozen=True)
class Record:
    """One open parent run: where it is and how to reach it."""

    uri: str
    experiment_id: str
    run_id: str
    profile: str


def lineage_tags(project: Path) -> dict[str, str]:
    """Git commit, DVC experiment name (``DVC_EXP_NAME`` when set), the Prefect flow run."""
    commit = git_commit(project)
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.flow_run_name"] = str(flow_run.name)
    except Exception:  # outside a flow run
        pass
    return tags


def open_parent(uri: str, project: Path, profile: str, *, run_name: str, params: dict[str, Any], tags: dict[str, str],
                parent_run_id: str | None = None) -> Record:
    """Create the parent run of a reproduction (nested under ``parent_run_id`` for a sweep point)."""
    exp = experiment_id(uri, experiment_name(profile), project)
    tags = {**lineage_tags(project), **tags}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(exp, run_name=run_name, tags=tags)
    log_params(uri, run.info.run_id, params)
    return Record(uri, exp, run.info.run_id, profile)


def close(record: Record, status: str) -> None:
    client(record.uri).set_terminated(record.run_id, status)


# --------------------------------------------------------------------------------------------------------------
# Logging in batches.


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:MAX_PARAM_LENGTH]


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow accepts 100 params per batch
        client(uri).log_batch(run_id, params=items[i:i + 100])


def log_metrics(uri: str, run_id: str, rows: list[tuple[str, float, int]]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v, step in rows if math.isfinite(float(v))]
    for i in range(0, len(items), 1000):  # and 1000 metrics
        client(uri).log_batch(run_id, metrics=items[i:i + 1000])


def numbers(d: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a flat metrics dict (booleans and strings left out)."""
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def read_history(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    pass
            rows.append(parsed)
    return rows


def scale_params(project: Path, scale: str, profile: str) -> dict[str, Any]:
    """The parameters this scale's stages ran with: the ``resolved_params.json`` each wrote beside its output, and
    the parameters the evaluate stage recorded in ``evaluation.json``.

    Not ``params.yaml`` now: that may have changed since the stages ran. Sections shared by several stages
    (``base``) are the same in each, so the union is one configuration.
    """
    resolved: dict[str, Any] = {"profile": profile}
    files = [project / output / layout.RESOLVED for output in
             (layout.PREPARED, layout.LATENTS, layout.CLASSIFIER,
              *(layout.stage_dir(scale, stage) for stage in ("teacher", "distill", "samples")), layout.REPORTS)]
    for path in [*files, project / layout.evaluation_file(scale)]:
        if not path.is_file():
            raise StageError(f"{path}: not found (the stage that writes it did not run)")
        try:
            params = json.loads(path.read_text())["params"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise StageError(f"{path}: not the resolved parameters of a stage ({type(e).__name__})") from None
        resolved |= {k: v for k, v in params.items() if isinstance(v, dict)}  # the params sections, not paths
    return resolved


def dvc_lock_md5(project: Path) -> dict[str, str]:
    """``{"distill@cpu-s": md5 of its first output}`` from ``dvc.lock``."""
    path = project / "dvc.lock"
    if not path.is_file():
        return {}
    lock = yaml.safe_load(path.read_text()) or {}
    out = {}
    for name, stage in (lock.get("stages") or {}).items():
        outs = stage.get("outs") or []
        if outs and outs[0].get("md5"):
            out[name] = outs[0]["md5"]
    return out


# --------------------------------------------------------------------------------------------------------------
# One scale.


def log_scale(record: Record, project: Path, scale: str, resolved: dict[str, Any], *,
              stages: list[str], register: bool = True, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """A child run for ``scale`` under ``record``'s parent, from the files the stages left; returns its summary."""
    c = client(record.uri)
    stage_metrics = {}
    for stage in ("teacher", "distill", "evaluate"):
        path = project / layout.metrics_file(scale, stage)
        if not path.is_file():
            raise StageError(f"{path}: not found (the {stage} stage of {scale} did not run)")
        try:
            stage_metrics[stage] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StageError(f"{path}: not valid JSON ({e})") from None
    evaluation = stage_metrics["evaluate"]
    md5 = dvc_lock_md5(project)
    scale_stages = [s for s in stages if s.endswith(f"@{scale}")]
    tags = {**lineage_tags(project), "mlflow.parentRunId": record.run_id, "scm.scale": scale,
            "scm.profile": record.profile, "dvc.stages": ",".join(scale_stages), **(extra_tags or {})}
    for s in scale_stages:
        if s in md5:
            tags[f"dvc.md5.{s.partition('@')[0]}"] = md5[s]
    run_id = c.create_run(record.experiment_id, run_name=scale, tags=tags).info.run_id
    try:
        # Params: what this scale is, and every resolved hyperparameter.
        params = {"scale": scale, "n_params": stage_metrics["teacher"]["n_params"],
                  **{k: evaluation[k] for k in map(layout.nfe, layout.METHODS) if k in evaluation},
                  **flatten(resolved)}
        log_params(record.uri, run_id, params)

        # Metrics: training curves per step, the evaluation, the stage summaries.
        rows: list[tuple[str, float, int]] = []
        for stage in ("teacher", "distill"):
            for row in read_history(project / layout.history_file(scale, stage)):
                step = int(row.get("step", 0))
                rows += [(f"{stage}/{k}", v, step) for k, v in row.items() if k != "step"]
        rows += [(k, v, 0) for k, v in numbers(evaluation).items()]
        for stage in ("teacher", "distill"):
            rows += [(f"{stage}_{k}", v, 0) for k, v in numbers(stage_metrics[stage]).items()]
        log_metrics(record.uri, run_id, rows)

        # Artifacts: sample grids, configuration, report, student weights.
        for grid in sorted((project / layout.stage_dir(scale, "samples")).glob(layout.grid_file("*"))):
            c.log_artifact(run_id, str(grid), "samples")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "resolved_params.yaml"
            cfg.write_text(yaml.safe_dump(resolved, sort_keys=False))
            c.log_artifact(run_id, str(cfg), "config")
        for stage in ("teacher", "distill", "samples"):
            prov = project / layout.stage_dir(scale, stage) / layout.RESOLVED
            if prov.is_file():
                c.log_artifact(run_id, str(prov), f"config/{stage}")
        for path in sorted((project / layout.metrics_file(scale, "*")).parent.glob("*.json")):
            c.log_artifact(run_id, str(path), "metrics")
        if (project / layout.REPORTS / layout.REPORT).is_file():
            c.log_artifact(run_id, str(project / layout.REPORTS / layout.REPORT), "report")
        student = project / layout.stage_dir(scale, "distill") / MODEL_FILE
        c.log_artifact(run_id, str(student), "student")
        summary = {"scale": scale, "run_id": run_id, "n_params": params["n_params"],
                   **{k: evaluation.get(k) for k in layout.HEADLINE}}
        if register:
            summary["model_version"] = register_student(record, run_id, scale, evaluation,
                                                         md5.get(f"distill@{scale}", ""))
    except BaseException:
        c.set_terminated(run_id, "FAILED")
        raise
    c.set_terminated(run_id, "FINISHED")
    return summary


def model_name(profile: str, scale: str) -> str:
    return f"scm-{slug(profile)}-{slug(scale)}-student"


def register_student(record: Record, run_id: str, scale: str, evaluation: dict[str, Any], md5: str) -> str:
    """Register the child run's ``student/`` artifact directory as a version of ``scm-<profile>-<scale>-student``.

    A plain directory (``model.safetensors``, no MLflow flavour) registered with ``create_model_version`` from a
    ``runs:/`` URI; ``models:/<name>/<version>`` then downloads it (``study/fetch.py``, ``teacher.source``).
    When the newest version already holds these exact weights (same DVC md5), it is reused.
    """
    from mlflow.exceptions import MlflowException

    c = client(record.uri)
    name = model_name(record.profile, scale)
    try:
        c.create_registered_model(name, description=f"sCM student (scale {scale}, profile {record.profile}), "
                                                    "weights as model.safetensors; see the source run for metrics")
    except MlflowException as e:
        if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
            raise
    if md5:
        versions = c.search_model_versions(f"name = '{name}'")
        same = [v for v in versions if v.tags.get("dvc.md5") == md5]
        if same:
            version = max(same, key=lambda v: int(v.version)).version
            c.set_tag(run_id, "scm.model_version", f"{name}/{version}")
            return str(version)
    tags = {k: f"{evaluation[k]:.6g}" for k in layout.HEADLINE if isinstance(evaluation.get(k), (int, float))}
    tags.update({"scale": scale, "profile": record.profile, "dvc.md5": md5})
    fid = lambda k: f"{evaluation[k]:.3f}" if isinstance(evaluation.get(k), (int, float)) else "n/a"
    description = (f"sCM student, scale {scale}: fid_clf 1-step {fid('fid_clf_scm1')}, 2-step {fid('fid_clf_scm2')} "
                   f"(teacher {fid('fid_clf_teacher')} at NFE {evaluation.get('nfe_teacher', 'n/a')})")
    mv = c.create_model_version(name, source=f"runs:/{run_id}/student", run_id=run_id, tags=tags, description=description)
    c.set_tag(run_id, "scm.model_version", f"{name}/{mv.version}")
    return str(mv.version)


# --------------------------------------------------------------------------------------------------------------
# Reading the record back: the cross-scale table.

TABLE_METRICS = (*(layout.metric("fid_clf", m) for m in layout.METHODS), layout.ratio("scm2"),
                 *(layout.metric(name, "scm2") for name in ("kid_clf_mean", "precision_clf", "recall_clf")),
                 *(layout.metric("sec_per_image", m) for m in ("teacher", "scm2")), layout.speedup("scm2"))


def search(uri: str, experiment_ids: list[str], filter_string: str):
    """``mlflow.search_runs`` against ``uri`` (a DataFrame), leaving the process's tracking URI as it was.

    ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` (for subprocesses); both are restored, so a
    later flow in this process does not silently log to this store.
    """
    import mlflow

    with _search_lock:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(uri)
        try:
            return mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string, max_results=10000)
        finally:
            mlflow.set_tracking_uri(previous)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def scaling_table(uri: str, experiment_id: str, filter_string: str, extra_params: tuple[str, ...] = ()):
    """The per-scale child runs as a typed table (params come back as strings: cast), sorted by parameter count."""
    import pandas as pd

    runs = search(uri, [experiment_id], filter_string)
    if runs.empty:
        return pd.DataFrame()
    table = pd.DataFrame({
        "scale": runs["params.scale"],
        "n_params": pd.to_numeric(runs["params.n_params"]).astype("int64"),
        "nfe_teacher": pd.to_numeric(runs.get("params.nfe_teacher"), errors="coerce"),
    })
    for key in extra_params:
        column = runs.get(f"params.{key}")
        if column is not None:
            table[key] = column.map(lambda v: yaml.safe_load(v) if isinstance(v, str) else v)
    for key in TABLE_METRICS:
        table[key] = runs.get(f"metrics.{key}")
    table["run_id"] = runs["run_id"]
    if "tags.scm.point" in runs:
        table.insert(0, "point", runs["tags.scm.point"])
    return table.sort_values([c for c in ("point", "n_params") if c in table]).reset_index(drop=True)


def scaling_figure(table, title: str = "FID against parameter count"):
    """FID (classifier features) against parameters for the teacher and sCM 1-/2-step, one line per sweep point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    groups = table.groupby("point", sort=False) if "point" in table else [("", table)]
    for point, rows in groups:
        rows = rows.sort_values("n_params")
        n = rows["n_params"] / 1e6
        for method, label, style in (("teacher", "teacher", "o-"), ("scm1", "sCM 1-step", "s--"),
                                     ("scm2", "sCM 2-step", "^-")):
            ax.plot(n, rows[layout.metric("fid_clf", method)], style, label=f"{label} {point}".strip())
    ax.set_xscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("FID (classifier features, fid_clf)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def log_figure(record: Record, fig, path: str) -> None:
    import matplotlib.pyplot as plt

    client(record.uri).log_figure(record.run_id, fig, path)
    plt.close(fig)
