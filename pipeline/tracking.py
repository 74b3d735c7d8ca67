"""The MLflow record of a reproduction, written while it runs and completed from the DVC-tracked files.

Layout: one experiment per profile (``scm-<profile>``); a parent run per reproduction named
``<profile>-<short commit>-<time>`` (or per sweep, with one run per sweep point under it); a child run per scale,
opened when that scale's first stage starts and closed after its last, so both carry real start and end times. A
child holds

- params: the scale, its parameter count, the NFE of each sampler and every resolved hyperparameter
  (``teacher.lr``, ``distill.steps``, ...): configuration is params only, never metrics;
- metrics, namespaced: ``train/<stage>/<column>`` (the training curves, one point per logged step with the time it
  was logged), ``eval/<metric>/<sampler>`` (``eval/fid_clf/2step``, ``eval/ratio_clf/1step``), ``speed/...``
  (seconds per image, speedups), ``time/<stage>_s`` and ``memory/<stage>_peak_mib`` (per stage, from the stage's own
  report), ``live/<stage>/...`` (the progress bar's values while the flow runs a stage) and MLflow's system metrics;
- inputs: the prepared dataset and its latents, with the content hash DVC recorded as the digest;
- artifacts: the sample grids, the resolved configuration, the report and the student, logged as an MLflow model
  (``student/``, see :func:`log_student`) and registered as ``scm-<profile>-<scale>-student`` with the alias
  ``latest`` (smoke runs are not registered);
- tags: the git commit, source, user, the DVC stages and the md5 of their outputs (from ``dvc.lock``), the
  Prefect flow run, ``DVC_EXP_NAME`` when set.

The parent carries the headline numbers of every scale (``<scale>/eval/fid_clf/2step``, ...) and a description
with the profile, the overrides and the Prefect run. Everything goes through :class:`mlflow.MlflowClient` with
explicit run ids: the active run of the fluent API is thread-local (mlflow/mlflow#13456), and the flows log from task
threads. Because the numbers are read from files that DVC tracks, the record is complete also when DVC skipped a
stage or restored it from its run cache (``python -m pipeline record`` writes it after a plain ``dvc repro``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
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
    try:  # experimentKind: the UI opens on the runs table, not MLflow 3's GenAI traces page
        return c.create_experiment(name, artifact_location=artifact_location(uri, project),
                                   tags={"mlflow.experimentKind": "custom_model_development"})
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
    import getpass

    commit = git_commit(project)
    tags = {"git.commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "mlflow.source.name": str(Path(project).resolve()), "mlflow.source.type": "PROJECT"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment (a container without /etc/passwd entry)
        pass
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            tags["prefect.flow_run_id"] = str(flow_run.id)
            tags["prefect.flow_run_name"] = str(flow_run.name)
            if flow_run.ui_url:
                tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    except Exception:  # outside a flow run
        pass
    return tags


def parent_name(profile: str, project: Path, label: str | None = None) -> str:
    """``<profile>-<short commit>-<YYYYmmdd-HHMMSS>`` (a sweep point: its label instead of the profile)."""
    commit = git_commit(project)
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "") if commit != "unknown" else "nogit"
    return f"{slug(label) if label else profile}-{short}-{time.strftime('%Y%m%d-%H%M%S')}"


def open_parent(uri: str, project: Path, profile: str, *, run_name: str, params: dict[str, Any], tags: dict[str, str],
                parent_run_id: str | None = None, description: str = "") -> Record:
    """Create the parent run of a reproduction (nested under ``parent_run_id`` for a sweep point)."""
    exp = experiment_id(uri, experiment_name(profile), project)
    tags = {**lineage_tags(project), **tags}
    if description:
        tags["mlflow.note.content"] = description
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(uri).create_run(exp, run_name=run_name, tags=tags)
    log_params(uri, run.info.run_id, params)
    return Record(uri, exp, run.info.run_id, profile)


UI_MODE = "workflowType=machine_learning"  # MLflow 3's UI opens in its GenAI mode unless a link asks for this one


def run_url(record: Record, run_id: str | None = None) -> str | None:
    """The run's page in the MLflow UI of an HTTP tracking server; None for a local store (no server to link to)."""
    if not record.uri.startswith(("http://", "https://")):
        return None
    return f"{record.uri.rstrip('/')}/#/experiments/{record.experiment_id}/runs/{run_id or record.run_id}?{UI_MODE}"


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


def log_metrics(uri: str, run_id: str, rows: list[tuple[str, float, int] | tuple[str, float, int, float]]) -> None:
    """``(key, value, step[, unix seconds])`` rows in batches; a row without a time is logged as now."""
    from mlflow.entities import Metric

    now = time.time()
    items = [Metric(row[0], float(row[1]), int(1000 * (row[3] if len(row) > 3 else now)), int(row[2]))
             for row in rows if math.isfinite(float(row[1]))]
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
              *(layout.stage_dir(scale, stage) for stage in ("teacher", "distill", "samples")),
              layout.reports_dir(profile))]
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
# Metric names.

SAMPLER = {"teacher": "teacher", "scm1": "1step", "scm2": "2step", "recon": "recon"}
_PER_SAMPLER = re.compile(r"^(?P<name>.+?)_(?P<sampler>teacher|scm1|scm2|recon)(?P<rest>_.+)?$")
_NOT_METRICS = {"scale", "n_samples", "seed_sets", "headline", "batch_size", "repeats", "method", "source",
                "n_params", "resumed_from_step", "final_r"}  # identities and configuration: params or tags
SPEED = ("sec_per_image", "images_per_s", "speedup")


def metric_name(key: str) -> str | None:
    """A key of ``metrics/<scale>/evaluate.json`` as an MLflow metric name; None for what is not a metric.

    ``fid_clf_scm2`` -> ``eval/fid_clf/2step``; ``fid_clf_scm2_std`` -> ``eval/fid_clf_std/2step``;
    ``fid_clf2_ratio_scm1`` -> ``eval/ratio_clf2/1step``; ``sec_per_image_teacher`` -> ``speed/sec_per_image/teacher``;
    ``speedup_scm2_fraction_of_nfe_ratio`` -> ``speed/speedup_of_nfe_ratio/2step``; ``clf_accuracy`` ->
    ``eval/clf_accuracy``; ``wall_seconds`` -> ``time/evaluate_s``; ``nfe_*`` are params.
    """
    if key in _NOT_METRICS or key.startswith("nfe_") or key.endswith("_status"):
        return None
    if key == "wall_seconds":
        return "time/evaluate_s"
    if key == "decoder_sec_per_image":
        return "speed/sec_per_image/decoder"
    m = _PER_SAMPLER.match(key)
    if not m:
        return f"eval/{key}"
    name, sampler, rest = m["name"], SAMPLER[m["sampler"]], m["rest"] or ""
    if name.endswith("_ratio"):  # fid_clf_ratio_scm2: the ratio in the space of fid_clf
        space = name[: -len("_ratio")].removeprefix("fid_").removeprefix("fd_")
        return f"eval/ratio_{space}/{sampler}"
    if name in SPEED:
        return f"speed/{name}{'_of_nfe_ratio' if rest == '_fraction_of_nfe_ratio' else rest}/{sampler}"
    return f"eval/{name}{rest}/{sampler}"


def evaluation_rows(evaluation: dict[str, Any]) -> list[tuple[str, float, int]]:
    """The evaluation's numbers as ``(name, value, 0)`` rows under :func:`metric_name`'s names."""
    return [(name, v, 0) for k, v in numbers(evaluation).items() if (name := metric_name(k))]


def stage_rows(stage: str, summary: dict[str, Any]) -> list[tuple[str, float, int]]:
    """A training stage's summary (``metrics/<scale>/<stage>.json``): losses under ``train/``, times under ``time/``."""
    rows = []
    for k, v in numbers(summary).items():
        if k in _NOT_METRICS:
            continue
        if k.endswith("_seconds"):
            rows.append((f"time/{stage}_{k.removesuffix('_seconds')}_s", v, 0))
        else:
            rows.append((f"train/{stage}/{k}", v, 0))
    return rows


def curve_rows(stage: str, history: list[dict[str, float]]) -> list[tuple[str, float, int, float]]:
    """A training curve as ``(train/<stage>/<column>, value, step, time)``: every logged step at the time it was logged."""
    rows = []
    for row in history:
        step, when = int(row.get("step", 0)), row.get("time")
        for k, v in row.items():
            if k not in ("step", "time"):
                rows.append((f"train/{stage}/{k}", v, step, *((when,) if when else ())))
    return rows


# --------------------------------------------------------------------------------------------------------------
# One scale: a child run opened before its first stage, completed after its last.

_monitors: dict[str, Any] = {}  # run id -> MLflow's system-metrics monitor while the run is open
_monitors_lock = threading.Lock()


def open_scale(record: Record, project: Path, scale: str, *, extra_tags: dict[str, str] | None = None,
               system_metrics: bool = True, start_time: float | None = None) -> str:
    """The child run of ``scale`` under ``record``'s parent, started now (with system metrics) or at ``start_time``
    (Unix seconds, for a record written afterwards); its run id."""
    tags = {**lineage_tags(project), "mlflow.parentRunId": record.run_id, "scm.scale": scale,
            "scm.profile": record.profile, **(extra_tags or {})}
    start_ms = int(1000 * start_time) if start_time else None
    run_id = client(record.uri).create_run(record.experiment_id, run_name=scale, tags=tags, start_time=start_ms).info.run_id
    if system_metrics:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=5, samples_before_logging=1,
                                           tracking_uri=record.uri)
            monitor.start()
            with _monitors_lock:
                _monitors[run_id] = monitor
        except Exception:  # psutil missing or the monitor refused: the record goes on without system metrics
            pass
    return run_id


def close_scale(record: Record, run_id: str, status: str, end_time: float | None = None) -> None:
    """Stop the run's system metrics and end it now (or at ``end_time``, Unix seconds)."""
    with _monitors_lock:
        monitor = _monitors.pop(run_id, None)
    if monitor is not None:
        monitor.finish()
    client(record.uri).set_terminated(run_id, status, end_time=int(1000 * end_time) if end_time else None)


def log_stage(record: Record, run_id: str, stage: str, *, seconds: float, peak_mib: float | None, outcome: str) -> None:
    """What the flow measured of one stage: its wall time, the stage's own peak memory, and what DVC did."""
    name = stage.partition("@")[0]
    rows = [(f"time/{name}_s", seconds, 0)]
    if peak_mib is not None:
        rows.append((f"memory/{name}_peak_mib", peak_mib, 0))
    log_metrics(record.uri, run_id, rows)
    client(record.uri).set_tag(run_id, f"dvc.outcome.{name}", outcome)


def log_live(record: Record, run_id: str, stage: str, values: dict[str, float], step: int) -> None:
    """The progress bar's values of a running stage (``live/<stage>/<name>``) at the bar's step, timestamped now."""
    name = stage.partition("@")[0]
    log_metrics(record.uri, run_id, [(f"live/{name}/{k}", v, step) for k, v in values.items()])


def log_inputs(record: Record, run_id: str, project: Path, resolved: dict[str, Any]) -> None:
    """The prepared images and their latents as MLflow dataset inputs, digest = DVC's md5 of each (``dvc.lock``)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    md5 = dvc_lock_md5(project)
    source = (resolved.get("data") or {}).get("source", "data")
    inputs = []
    for stage, path, name, context in (("data", layout.PREPARED, f"{source} (prepared images)", "training"),
                                       ("encode", layout.LATENTS, f"{source} (latents)", "training")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # several sources claim a local path; all are the same to us
            src = resolve_dataset_source((Path(project).resolve() / path).as_uri())
        dataset = MetaDataset(src, name=name, digest=(md5.get(stage) or "unknown")[:36])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    client(record.uri).log_inputs(run_id, datasets=inputs)


def log_scale(record: Record, project: Path, scale: str, resolved: dict[str, Any], *, run_id: str,
              stages: list[str], register: bool = True, end_time: float | None = None) -> dict[str, Any]:
    """Complete ``scale``'s child run ``run_id`` from the files its stages left, end it; return its summary."""
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
    tags = {"dvc.stages": ",".join(scale_stages)}
    for s in scale_stages:
        if s in md5:
            tags[f"dvc.md5.{s.partition('@')[0]}"] = md5[s]
    try:
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
        # Params: what this scale is, and every resolved hyperparameter.
        params = {"scale": scale, "n_params": stage_metrics["teacher"]["n_params"],
                  **{k: evaluation[k] for k in map(layout.nfe, layout.METHODS) if k in evaluation},
                  **flatten(resolved)}
        log_params(record.uri, run_id, params)
        log_inputs(record, run_id, project, resolved)

        # Metrics: training curves per step (at the times they were logged), the evaluation, the stage summaries.
        rows: list[tuple] = []
        for stage in ("teacher", "distill"):
            rows += curve_rows(stage, read_history(project / layout.history_file(scale, stage)))
            rows += stage_rows(stage, stage_metrics[stage])
        rows += evaluation_rows(evaluation)
        log_metrics(record.uri, run_id, rows)

        # Artifacts: sample grids, configuration, report, the student as an MLflow model.
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
        report = project / layout.reports_dir(record.profile) / layout.REPORT
        if report.is_file():
            c.log_artifact(run_id, str(report), "report")
        log_student(record, run_id, project, scale)
        summary = {"scale": scale, "run_id": run_id, "n_params": params["n_params"],
                   **{k: evaluation.get(k) for k in layout.HEADLINE}}
        if register:
            summary["model_version"] = register_student(record, run_id, scale, evaluation,
                                                         md5.get(f"distill@{scale}", ""))
    except BaseException:
        close_scale(record, run_id, "FAILED", end_time)
        raise
    close_scale(record, run_id, "FINISHED", end_time)
    return summary


def stage_times(project: Path, scale: str) -> tuple[float | None, float | None]:
    """When ``scale``'s stages ran, from their files: the first logged teacher step (or the teacher's output) and
    the evaluation's metrics file (Unix seconds; None where a file is missing)."""
    first = next((row["time"] for row in read_history(project / layout.history_file(scale, "teacher")) if "time" in row), None)
    teacher = project / layout.stage_dir(scale, "teacher") / layout.PROVENANCE
    if first is None and teacher.is_file():
        first = teacher.stat().st_mtime - float(json.loads(teacher.read_text()).get("seconds", {}).get("train", 0.0))
    evaluation = project / layout.metrics_file(scale, "evaluate")
    return first, (evaluation.stat().st_mtime if evaluation.is_file() else None)


def record_outputs(project: Path, uri: str, profile: str, scales: tuple[str, ...], stages: list[str], *,
                   register: bool) -> tuple[Record, list[dict[str, Any]]]:
    """The record of a finished ``dvc repro`` (outputs already on disk), written afterwards: a parent run, one
    child per scale with the times its stages ran, the headline numbers on the parent."""
    record = open_parent(uri, project, profile, run_name=parent_name(profile, project),
                         params={"profile": profile, "scales": list(scales), "overrides": "none"},
                         tags={"scm.kind": "record", "scm.project": str(project)},
                         description=f"Record of the outputs of a `dvc repro` (profile `{profile}`, scales "
                                     f"{', '.join(scales)}), written afterwards by `python -m pipeline record`.")
    summaries = []
    try:
        for scale in scales:
            start, end = stage_times(project, scale)
            run_id = open_scale(record, project, scale, system_metrics=False, start_time=start)
            summaries.append(log_scale(record, project, scale, scale_params(project, scale, profile), run_id=run_id,
                                       stages=stages, register=register, end_time=end))
        log_headline(record, summaries)
        log_figure(record, scaling_figure(scaling_table(uri, record.experiment_id,
                                                        f"tags.mlflow.parentRunId = '{record.run_id}'")),
                   "scaling/fid_vs_params.png")
    except BaseException:
        close(record, "FAILED")
        raise
    close(record, "FINISHED")
    return record, summaries


def log_headline(record: Record, summaries: list[dict[str, Any]]) -> None:
    """Every scale's headline numbers on the parent run: ``<scale>/eval/fid_clf/2step``, ..."""
    rows = [(f"{s['scale']}/{name}", v, 0) for s in summaries for k, v in s.items()
            if k in layout.HEADLINE and isinstance(v, (int, float)) and (name := metric_name(k))]
    log_metrics(record.uri, record.run_id, rows)


STUDENT_ALIAS = "current"  # models:/<name>@current: the newest registered student of a profile and scale


def log_student(record: Record, run_id: str, project: Path, scale: str) -> None:
    """The student as an MLflow pyfunc model under the run's ``student/``: seeds in, uint8 images out, with a
    signature and an input example (``study/mlflow_student.py``); inside, the project's model file and the student
    exported as a diffusers pipeline, safetensors only."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from study.export import export_pipeline

    student = project / layout.stage_dir(scale, "distill")
    with tempfile.TemporaryDirectory(prefix="scm-mlflow-model-") as tmp:
        index = export_pipeline(student, project / layout.LATENTS, Path(tmp) / "pipeline")
        c, h, w = index["image_shape"]
        signature = ModelSignature(inputs=Schema([ColSpec("long", "seed")]),
                                   outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, h, w, c))]),
                                   params=ParamSchema([ParamSpec("num_inference_steps", "long", 2)]))
        code = Path(__file__).resolve().parent.parent / "study" / "mlflow_student.py"
        mlflow.pyfunc.save_model(Path(tmp) / "student", python_model=str(code), signature=signature,
                                 input_example=pd.DataFrame({"seed": [0, 1]}),  # the first two images
                                 artifacts={"pipeline": str(Path(tmp) / "pipeline"), "student": str(student / MODEL_FILE)},
                                 pip_requirements=[f"mlflow=={mlflow.__version__}"])
        client(record.uri).log_artifacts(run_id, str(Path(tmp) / "student"), "student")


def model_name(profile: str, scale: str) -> str:
    return f"scm-{slug(profile)}-{slug(scale)}-student"


def register_student(record: Record, run_id: str, scale: str, evaluation: dict[str, Any], md5: str) -> str:
    """Register the child run's ``student/`` MLflow model as a version of ``scm-<profile>-<scale>-student``, with the
    alias ``current``; ``models:/<name>@current`` then loads it in MLflow or downloads its ``model.safetensors``
    (``study/fetch.py``: ``teacher.source``, ``generate``). When the newest version already holds these exact
    weights (same DVC md5), it is reused.
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
    c.set_registered_model_alias(name, STUDENT_ALIAS, mv.version)
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
    for key in TABLE_METRICS:  # columns keep the evaluate stage's names (fid_clf_scm2); MLflow's are namespaced
        table[key] = runs.get(f"metrics.{metric_name(key)}")
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
