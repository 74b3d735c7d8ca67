"""Prefect flows over the DVC pipeline: ``reproduce`` runs the study, ``sweep`` runs variations of it in parallel.

How the three tools share the work
----------------------------------
- **DVC decides what is stale, and records lineage.** Each stage task runs ``dvc repro --single-item <stage>`` as
  a subprocess in the project directory (``teacher@cpu-s`` for a per-scale stage), in the dependency order DVC's own
  graph gives. DVC runs the stage, skips it (``dvc.lock`` matches) or restores its outputs from the run cache, and
  updates ``dvc.lock`` in every case, so after a flow ``dvc status`` is clean and ``dvc repro`` does nothing. The flow
  never caches results itself (``NO_CACHE``): one bookkeeper, not two.
- **Prefect runs and shows the work.** One task per stage and scale, named like the study (``data``,
  ``teacher-cpu-s``, ``evaluate-cpu-xs``, ``report``), with the stage's output streamed into the task's log, retries
  on transient failures (a held DVC lock, a busy SQLite file, a killed process) and none on a stage's own error,
  whose ``error: ...`` line becomes the failed task's message. Results are Prefect artifacts: ``summary-<profile>``
  (a table from ``reports/summary.json``), ``report-<profile>`` (``reports/report.md``, images as links) and
  ``scaling-<profile>`` (the cross-scale table read back from MLflow).
- **MLflow keeps the record** (``pipeline/tracking.py``): after the stages, the flow reads the DVC-tracked files
  (metrics JSON, training-curve CSVs, sample grids, weights) into a parent run with one child run per scale and
  registers each student. Reading files after the fact means the record exists even when DVC skipped every stage.

A profile and ``-S``-style overrides are validated with the stages' own loader before anything runs, then written
into ``params.yaml`` (as ``dvc exp run -S`` would), because DVC only knows what ``params.yaml`` says.

DVC holds a lock on a workspace while it works, so the stage tasks of one project run one after another. ``sweep``
gets its parallelism from isolated copies: each point runs in its own clone of the project (sharing DVC's cache, so
unchanged stages are restored rather than recomputed) and logs to the same MLflow store under one parent run.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import project as dvc_driver
from pipeline import tracking
from study import layout
from study.errors import StageError
from study.files import redact
from study.params import deep_merge

_dvc_api_lock = threading.Lock()  # DVC's Python API is used from sweep threads: one call at a time


# --------------------------------------------------------------------------------------------------------------
# Names shown in the UI.


def _stage_run_name() -> str:
    return dvc_driver.task_name(task_run.parameters["stage"])


def _record_run_name() -> str:
    return f"mlflow-{task_run.parameters['scale']}"


def _point_run_name() -> str:
    return f"point-{dvc_driver.slug(task_run.parameters['label'])}"


def _flow_run_name(kind: str, name: str | None) -> str:
    return "-".join(filter(None, (kind, dvc_driver.slug(name) if name else None, time.strftime("%Y%m%d-%H%M%S"))))


def _reproduce_run_name() -> str:
    return _flow_run_name("reproduce", flow_run.parameters.get("label") or flow_run.parameters.get("profile"))


def _sweep_run_name() -> str:
    return _flow_run_name("sweep", flow_run.parameters.get("profile"))


def _retry_transient(_task, _task_run, state) -> bool:
    """Retry a stage only when another attempt can help (see ``pipeline.project.TRANSIENT``)."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    if isinstance(exc, dvc_driver.StageFailed):
        return exc.transient
    return isinstance(exc, OSError)


# --------------------------------------------------------------------------------------------------------------
# Tasks.


@task(name="configure", task_run_name="configure", cache_policy=NO_CACHE)
def configure(project: str | None, profile: str | None, overrides: dvc_driver.Overrides, scales: list[str] | None,
              ) -> tuple[dvc_driver.Configuration, list[str], str]:
    """Validate the request, record it in ``params.yaml``, list the stages to run in order; and the params digest."""
    logger = get_run_logger()
    cfg = dvc_driver.configure(project, profile, overrides, scales)
    if dvc_driver.write_params(cfg):
        logger.info("params.yaml: profile %s%s", cfg.profile, f", {dvc_driver.describe(cfg.overrides)}" if cfg.overrides else "")
    with _dvc_api_lock:
        stages = dvc_driver.stage_order(cfg.project, cfg.scales)
    logger.info("project %s, scales %s: %s", cfg.project, ", ".join(cfg.scales), " -> ".join(stages))
    return cfg, stages, dvc_driver.params_digest(cfg.project)


@task(name="stage", task_run_name=_stage_run_name, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def run_stage(project: Path, stage: str, tracking_uri: str, params_digest: str, pull: bool = False,
              force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``, its output streamed into this task's log; refused if params.yaml changed."""
    logger = get_run_logger()
    dvc_driver.check_params_unchanged(project, params_digest, stage)
    result = dvc_driver.repro_stage(project, stage, log=logger.info, env=dvc_driver.subprocess_env(tracking_uri), pull=pull, force=force)
    logger.info("%s: %s in %.1f s", stage, result.outcome, result.seconds)
    return {"stage": stage, "outcome": result.outcome, "seconds": round(result.seconds, 2)}


@task(name="dvc-push", task_run_name="dvc-push", retries=2, retry_delay_seconds=[10, 60], cache_policy=NO_CACHE)
def push_outputs(project: Path) -> None:
    """``dvc push``: share this run's outputs (and run cache) with other machines through the DVC remote."""
    get_run_logger().info(dvc_driver.dvc(project, "push", "--run-cache").strip())


@task(name="mlflow-open", task_run_name="mlflow-open", retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def open_record(cfg: dvc_driver.Configuration, tracking_uri: str | None, parent_run_id: str | None, label: str | None,
                kind: str = "reproduction", extra_params: dict[str, Any] | None = None) -> tracking.Record:
    """The MLflow parent run of this reproduction (under ``parent_run_id`` for a sweep point)."""
    uri = tracking.tracking_uri(cfg.project, tracking_uri)
    params = {"profile": cfg.profile, "scales": list(cfg.scales), "overrides": dvc_driver.describe(cfg.overrides) or "none",
              **(extra_params or {})}
    tags = {"scm.kind": kind, "scm.project": str(cfg.project)}
    if label:
        tags["scm.point"] = label
    name = label or f"{kind}-{cfg.profile}"
    record = tracking.open_parent(uri, cfg.project, cfg.profile, run_name=name, params=params, tags=tags,
                           parent_run_id=parent_run_id)
    get_run_logger().info("MLflow: %s, experiment %s, run %s", redact(uri), tracking.experiment_name(cfg.profile), record.run_id)
    return record


@task(name="mlflow-scale", task_run_name=_record_run_name, retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def record_scale(record: tracking.Record, cfg: dvc_driver.Configuration, scale: str, stages: list[str],
                 label: str | None = None) -> dict[str, Any]:
    """The child run of ``scale``: params, curves, evaluation, grids, config; the student registered."""
    resolved = tracking.scale_params(cfg.project, scale, cfg.profile)  # what this scale's stages actually read
    tags = {"scm.point": label} if label else {}
    summary = tracking.log_scale(record, cfg.project, scale, resolved, stages=stages, extra_tags=tags)
    get_run_logger().info("%s: run %s, fid_clf 2-step %s, model version %s", scale, summary["run_id"],
                          summary.get(layout.metric("fid_clf", "scm2")), summary.get("model_version"))
    return summary


@task(name="compare-scales", task_run_name="compare-scales", cache_policy=NO_CACHE)
def compare_scales(record: tracking.Record, key: str) -> list[dict[str, Any]]:
    """Read the child runs back from MLflow, plot FID against parameters on the parent, publish the table."""
    table = tracking.scaling_table(record.uri, record.experiment_id, f"tags.mlflow.parentRunId = '{record.run_id}'")
    if table.empty:
        raise StageError(f"MLflow run {record.run_id}: no per-scale child runs to compare")
    tracking.log_figure(record, tracking.scaling_figure(table), "scaling/fid_vs_params.png")
    rows = _records(table)
    create_table_artifact(rows, key=f"scaling-{key}",
                          description=f"Per-scale results read back from MLflow (parent run `{record.run_id}`, "
                                      f"`{record.uri}`); the FID-vs-parameters figure is logged on that run.")
    return rows


@task(name="publish-report", task_run_name="publish-report", cache_policy=NO_CACHE)
def publish_report(record: tracking.Record, cfg: dvc_driver.Configuration, key: str) -> None:
    """Prefect artifacts from ``reports/``; the report files also on the MLflow parent run."""
    reports = cfg.project / layout.REPORTS
    summary = json.loads((reports / layout.SUMMARY).read_text())
    rows = [dvc_driver.flatten({k: v for k, v in entry.items() if k != "wall_seconds"}) for entry in summary["scales"]]
    create_table_artifact(rows, key=f"summary-{key}", description=f"reports/summary.json of {cfg.project}")
    create_markdown_artifact(_report_markdown(reports, record), key=f"report-{key}",
                             description=f"reports/report.md of {cfg.project}")
    c = tracking.client(record.uri)
    for path in sorted(reports.iterdir()):
        if path.suffix in (".md", ".json", ".png"):
            c.log_artifact(record.run_id, str(path), "report")
    if (cfg.project / "dvc.lock").is_file():
        c.log_artifact(record.run_id, str(cfg.project / "dvc.lock"), "lineage")


def _records(table) -> list[dict[str, Any]]:
    """A DataFrame as JSON-safe rows (NaN -> None) for a Prefect table artifact."""
    rows = json.loads(table.to_json(orient="records"))
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def _report_markdown(reports: Path, record: tracking.Record) -> str:
    """``report.md`` with its images turned into links: the UI shows images only from public URLs."""
    text = (reports / layout.REPORT).read_text()
    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: f"[{m.group(1) or m.group(2)}]({(reports / m.group(2)).as_uri()}) "
                  f"(`{reports / m.group(2)}`)", text)
    return (f"{text}\n\n---\nImages: the links above are files on the machine that ran the flow; the same files are "
            f"artifacts of MLflow run `{record.run_id}` (`{record.uri}`, under `report/`).\n")


# --------------------------------------------------------------------------------------------------------------
# reproduce


@flow(name="reproduce", flow_run_name=_reproduce_run_name, validate_parameters=True)
def reproduce(profile: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
              scales: list[str] | None = None, project: str | None = None, tracking_uri: str | None = None,
              pull: bool = False, push: bool = False, force: bool = False, parent_run_id: str | None = None,
              label: str | None = None) -> dict[str, Any]:
    """Reproduce the study in one DVC project: data -> encode -> classifier -> (teacher -> distill -> sample ->
    evaluate) per scale -> report, then record it in MLflow and publish it as Prefect artifacts.

    Args:
        profile: a profile under ``profiles:`` of params.yaml (default: the one params.yaml selects).
        overrides: ``["distill.steps=500", ...]`` (``dvc exp run -S`` syntax) or ``{"distill.steps": 500}``.
        scales: shorthand for the override ``base.scales``.
        project: the project directory (default: the current directory if it holds dvc.yaml, else this checkout).
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:////<project>/mlflow.db``).
        pull: ``dvc repro --pull`` (fetch missing outputs and run-cache entries from the DVC remote).
        push: ``dvc push --run-cache`` at the end (share the results through the DVC remote).
        force: ``dvc repro --force`` (run every stage even if DVC says it is up to date).
        parent_run_id: nest this reproduction's MLflow run under that run (used by ``sweep``).
        label: a name for this reproduction in MLflow and artifact keys (used by ``sweep``).
    """
    with dvc_driver.flow_lock(dvc_driver.find_project(project)):  # one flow per project: no interleaved params
        cfg, stages, digest = configure(project, profile, overrides, scales)
        record = open_record(cfg, tracking_uri, parent_run_id, label)
        key = dvc_driver.slug(f"{cfg.profile}-{label}" if label else cfg.profile)
        try:
            outcomes = [run_stage(cfg.project, stage, record.uri, digest, pull=pull, force=force) for stage in stages]
            if push:
                push_outputs(cfg.project)
            children = [record_scale(record, cfg, scale, stages, label=label) for scale in cfg.scales]
            table = compare_scales(record, key)
            publish_report(record, cfg, key)
        except BaseException:
            tracking.close(record, "FAILED")
            raise
        tracking.close(record, "FINISHED")
    return {"project": str(cfg.project), "profile": cfg.profile, "scales": list(cfg.scales),
            "tracking_uri": redact(record.uri), "experiment_id": record.experiment_id, "run_id": record.run_id,
            "stages": outcomes, "children": children, "table": table}


# --------------------------------------------------------------------------------------------------------------
# sweep


def sweep_points(grid: dict[str, list[Any]] | None, scales: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
    """The cartesian product of ``scales`` (one scale per point) and the ``grid`` values, as (label, overrides)."""
    axes: list[list[tuple[str, dict[str, Any]]]] = []
    if scales:
        axes.append([(s, {"base.scales": [s]}) for s in scales])
    for key, values in (grid or {}).items():
        if not isinstance(values, (list, tuple)) or not values:
            raise StageError(f"grid {key}: expected a non-empty list of values, got {values!r}")
        axes.append([(f"{key}={dvc_driver.format_value(v)}", {key: v}) for v in values])
    if not axes:
        raise StageError("sweep: give scales and/or a grid of overrides (nothing to sweep)")
    points = []
    for combo in itertools.product(*axes):
        label = ",".join(part for part, _ in combo)
        points.append((label, {k: v for _, o in combo for k, v in o.items()}))
    return points


@task(name="point", task_run_name=_point_run_name, cache_policy=NO_CACHE)
def run_point(project: Path, run_dir: Path, cache_dir: str, label: str, profile: str, overrides: dict[str, Any],
              tracking_uri: str, parent_run_id: str, pull: bool = False) -> dict[str, Any]:
    """One sweep point: an isolated copy of the project, then ``reproduce`` in it (a subflow)."""
    logger = get_run_logger()
    dvc_driver.isolate(project, run_dir, cache_dir=cache_dir)
    logger.info("%s: isolated copy at %s (DVC cache %s)", label, run_dir, cache_dir)
    return reproduce(profile=profile, overrides=overrides, project=str(run_dir), tracking_uri=tracking_uri, pull=pull,
                     parent_run_id=parent_run_id, label=label)


@task(name="compare-points", task_run_name="compare-points", cache_policy=NO_CACHE)
def compare_points(record: tracking.Record, keys: list[str], key: str) -> list[dict[str, Any]]:
    """Every (point, scale) child run of the sweep in one table and one figure on the sweep's parent run."""
    table = tracking.scaling_table(record.uri, record.experiment_id, f"tags.`scm.sweep_run_id` = '{record.run_id}'",
                            extra_params=tuple(keys))
    if table.empty:
        raise StageError(f"MLflow sweep run {record.run_id}: no per-scale runs found")
    tracking.log_figure(record, tracking.scaling_figure(table, "FID against parameter count, per sweep point"),
                 "scaling/fid_vs_params.png")
    rows = _records(table)
    create_table_artifact(rows, key=f"sweep-{key}", description=f"Sweep results read back from MLflow (parent run "
                                                                  f"`{record.run_id}`, `{record.uri}`)")
    return rows


@flow(name="sweep", flow_run_name=_sweep_run_name, task_runner=ThreadPoolTaskRunner(max_workers=16))
def sweep(grid: dict[str, list[Any]] | None = None, scales: list[str] | None = None, profile: str | None = None,
          overrides: list[str] | dict[str, Any] | None = None, project: str | None = None,
          runs_dir: str | None = None, concurrency: int = 2, tracking_uri: str | None = None,
          pull: bool = False) -> dict[str, Any]:
    """Run the study once per point of a grid (and/or per scale), each point in its own copy of the project,
    at most ``concurrency`` at a time, all recorded in MLflow under one parent run.

    Args:
        grid: ``{"distill.steps": [500, 1000], "distill.lr": [1e-4, 2e-4]}``: every combination is a point.
        scales: run each of these scales as its own point (combined with the grid).
        profile, overrides: as for ``reproduce``; applied to every point, the point's values on top.
        project: the project to copy (default as for ``reproduce``); it is not modified.
        runs_dir: where the copies go (default ``<project>/.sweeps``): ``<runs_dir>/<sweep>/<point>``.
        concurrency: points running at once (default 2, the cores of this machine).
        tracking_uri: MLflow store (default as for ``reproduce``, in the original project).
        pull: ``dvc repro --pull`` in every copy.
    """
    logger = get_run_logger()
    if concurrency < 1:
        raise StageError(f"concurrency: expected at least 1, got {concurrency}")
    base_overrides = dvc_driver.parse_overrides(overrides)
    points = sweep_points(grid, scales)
    # Every point is validated before anything runs or is copied.
    configs = [dvc_driver.configure(project, profile, deep_merge(base_overrides, dvc_driver.parse_overrides(o)), None)
               for _, o in points]
    root = configs[0].project
    uri = tracking.tracking_uri(root, tracking_uri)
    with _dvc_api_lock:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            cache_dir = repo.cache.local_cache_dir
    sweep_dir = Path(runs_dir or root / ".sweeps").resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    keys = sorted({k for _, o in points for k in dvc_driver.flatten(dvc_driver.parse_overrides(o))})
    # The experiment and the parent run exist before the fan-out (no creation races on the store).
    record = open_record(configs[0], uri, None, None, kind="sweep",
                         extra_params={"grid": json.dumps(grid or {}), "sweep_scales": json.dumps(scales or []),
                                       "points": len(points), "sweep_dir": str(sweep_dir)})
    logger.info("sweep of %d points in %s, %d at a time: %s", len(points), sweep_dir, concurrency,
                "; ".join(label for label, _ in points))
    futures, running = [], []
    try:
        for (label, point), cfg in zip(points, configs):
            while len(running) >= concurrency:  # bounded fan-out: wait for a slot
                done, _ = concurrent.futures.wait([f.wrapped_future for f in running],
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                running = [f for f in running if f.wrapped_future not in done]
            future = run_point.submit(root, sweep_dir / dvc_driver.slug(label), cache_dir, label, cfg.profile,
                                      deep_merge(base_overrides, dvc_driver.parse_overrides(point)), uri,
                                      record.run_id)
            futures.append((label, future))
            running.append(future)
        results, failed = {}, []
        for label, future in futures:
            future.wait()
            if future.state.is_completed():
                results[label] = future.result()
            else:
                failed.append(f"{label}: {future.state.message}")
        _tag_sweep_children(record, results)
        table = compare_points(record, keys, dvc_driver.slug(configs[0].profile)) if results else []
        if failed:
            raise StageError(f"{len(failed)} of {len(points)} sweep points failed: " + "; ".join(failed))
    except BaseException:
        tracking.close(record, "FAILED")
        raise
    tracking.close(record, "FINISHED")
    return {"run_id": record.run_id, "tracking_uri": redact(uri), "experiment_id": record.experiment_id,
            "sweep_dir": str(sweep_dir), "points": results, "table": table}


def _tag_sweep_children(record: tracking.Record, results: dict[str, dict[str, Any]]) -> None:
    """Tag every per-scale run of the sweep with the sweep's run id, so one query finds them all."""
    c = tracking.client(record.uri)
    for result in results.values():
        for child in result["children"]:
            c.set_tag(child["run_id"], "scm.sweep_run_id", record.run_id)
