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
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run, task_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

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
    try:
        exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    except Exception:  # a Failed state returned by the task (a stage's own error) holds no exception
        return False
    if isinstance(exc, dvc_driver.StageFailed):
        return exc.transient
    return isinstance(exc, OSError)


# --------------------------------------------------------------------------------------------------------------
# Tasks.


@task(name="configure", task_run_name="configure", cache_policy=NO_CACHE)
def configure(project: str | None, profile: str | None, overrides: dvc_driver.Overrides, scales: list[str] | None,
              ) -> tuple[dvc_driver.Configuration, list[str], dict[str, list[str]], str, bool]:
    """Validate the request, record it in ``params.yaml``, list the stages to run in order with their upstream
    stages in DVC's graph; and the params digest and whether a DVC remote is configured."""
    logger = get_run_logger()
    cfg = dvc_driver.configure(project, profile, overrides, scales)
    if dvc_driver.write_params(cfg):
        logger.info("params.yaml: profile %s%s", cfg.profile, f", {dvc_driver.describe(cfg.overrides)}" if cfg.overrides else "")
    with _dvc_api_lock:
        stages, upstream = dvc_driver.stage_graph(cfg.project, cfg.scales)
        remote = dvc_driver.has_remote(cfg.project)
    logger.info("profile %s, project %s, scales %s: %s", cfg.profile, cfg.project, ", ".join(cfg.scales),
                " -> ".join(stages))
    return cfg, stages, upstream, dvc_driver.params_digest(cfg.project), remote


# A tqdm line: "...  45%|####5     | 9/20 [00:01<00:01,  6.7step/s, mse=0.1234, r=0.45, avg_img_s=900]".
_BAR = re.compile(r"\|\s*(\d+)/(\d+) \[")
_POSTFIX = re.compile(r"(\w+)=([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)")
_PEAK = re.compile(r"^\w+: peak memory (\d+(?:\.\d+)?) MiB")


class StageWatcher:
    """Reads a stage's output as it streams: progress (a Prefect progress artifact, and the bar's values as live
    MLflow metrics of the scale's run) and the peak memory the stage reports at its end."""

    def __init__(self, stage: str, log, live: tuple[tracking.Record, str] | None, every: float = 10.0) -> None:
        self.stage, self._log, self.live, self.every = stage, log, live, every
        self.artifact_id, self.peak_mib, self._last = None, None, 0.0

    def __call__(self, line: str) -> None:
        self._log(line)
        if (m := _PEAK.match(line)) is not None:
            self.peak_mib = float(m.group(1))
        if (m := _BAR.search(line)) is None:
            return
        done, total = int(m.group(1)), max(int(m.group(2)), 1)
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(
                100.0 * done / total, key=f"progress-{dvc_driver.slug(dvc_driver.task_name(self.stage))}",
                description=f"{self.stage}: progress of its current bar")
        elif done == total or time.monotonic() - self._last >= self.every:
            update_progress_artifact(self.artifact_id, 100.0 * done / total)
        else:
            return
        self._last = time.monotonic()
        values = {k: float(v) for k, v in _POSTFIX.findall(line.split("[", 1)[-1])}
        if self.live and values:
            tracking.log_live(*self.live, self.stage, values, step=done)


@task(name="stage", task_run_name=_stage_run_name, retries=2, retry_delay_seconds=[10, 60],
      retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)
def run_stage(project: Path, stage: str, tracking_uri: str, params_digest: str, pull: bool = False,
              force: bool = False, remote: bool = False, live: tuple[tracking.Record, str] | None = None,
              position: str = ""):
    """``dvc repro --single-item <stage>``, its output streamed into this task's log; refused if params.yaml changed.

    Ends in the state ``Ran``, ``Restored`` (from DVC's run cache), ``Pulled`` (from the remote) or ``Skipped`` (up
    to date), or ``Failed`` with the stage's own error line as the message (no traceback: it is the user's error,
    and it is shown once). A transient failure raises, so that the task is retried.
    """
    logger = get_run_logger()
    dvc_driver.check_params_unchanged(project, params_digest, stage)
    logger.info("stage %s: %s", position, stage)  # "stage 4 of 12: teacher@cpu-xs"
    watcher = StageWatcher(stage, logger.info, live)
    try:
        result = dvc_driver.repro_stage(project, stage, log=watcher, env=dvc_driver.subprocess_env(tracking_uri),
                                        pull=pull, force=force, remote=remote)
    except dvc_driver.StageFailed as e:
        if e.transient:
            raise
        return Failed(message=str(e))
    if watcher.artifact_id is not None:
        update_progress_artifact(watcher.artifact_id, 100.0)
    logger.info("%s: %s in %.1f s", stage, result.outcome, result.seconds)
    data = {"stage": stage, "outcome": result.outcome, "seconds": round(result.seconds, 2), "peak_mib": watcher.peak_mib}
    return Completed(name=result.outcome.capitalize(), message=f"{result.outcome} in {result.seconds:.1f} s", data=data)


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
    name = tracking.parent_name(cfg.profile if kind == "reproduction" else f"{cfg.profile}-{kind}", cfg.project, label)
    description = (f"{'Sweep' if kind == 'sweep' else 'Reproduction'} of the sCM study, profile `{cfg.profile}`, "
                   f"scales {', '.join(cfg.scales)}; overrides: {dvc_driver.describe(cfg.overrides) or 'none'}.")
    if flow_run.ui_url:
        description += f" Prefect flow run: [{flow_run.name}]({flow_run.ui_url})."
    record = tracking.open_parent(uri, cfg.project, cfg.profile, run_name=name, params=params, tags=tags,
                                  parent_run_id=parent_run_id, description=description)
    get_run_logger().info("MLflow: %s, experiment %s, run %s", redact(uri), tracking.experiment_name(cfg.profile), record.run_id)
    return record


@task(name="mlflow-scale", task_run_name=_record_run_name, retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def record_scale(record: tracking.Record, cfg: dvc_driver.Configuration, scale: str, stages: list[str], run_id: str,
                 register: bool = True) -> dict[str, Any]:
    """Complete the child run of ``scale``: params, curves, evaluation, inputs, grids, config, the student model
    (registered unless ``register`` is false); the run ends now."""
    resolved = tracking.scale_params(cfg.project, scale, cfg.profile)  # what this scale's stages actually read
    summary = tracking.log_scale(record, cfg.project, scale, resolved, run_id=run_id, stages=stages, register=register)
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
    """Prefect artifacts from ``reports/<profile>/`` and a link to the MLflow run; the report files also on the
    MLflow parent run."""
    reports = cfg.project / layout.reports_dir(cfg.profile)
    summary = json.loads((reports / layout.SUMMARY).read_text())
    rows = [_headline_row(entry) for entry in summary["scales"]]
    create_table_artifact(rows, key=f"summary-{key}", description=f"The headline numbers of `{reports / layout.SUMMARY}` "
                          "(fid_clf: mean over seed sets; ratio = sCM / teacher; ✓ within the study's targets)")
    c = tracking.client(record.uri)
    for path in sorted(reports.rglob("*")):
        if path.suffix in (".md", ".json", ".png", ".csv"):
            c.log_artifact(record.run_id, str(path), str(Path("report") / path.parent.relative_to(reports)).rstrip("/."))
    if (cfg.project / "dvc.lock").is_file():
        c.log_artifact(record.run_id, str(cfg.project / "dvc.lock"), "lineage")
    create_markdown_artifact(_report_markdown(reports, record), key=f"report-{key}",
                             description=f"{reports / layout.REPORT}, images embedded")
    url = tracking.run_url(record)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {record.run_id}", key=f"mlflow-{key}",
                             description="This reproduction's MLflow parent run (one child run per scale)")
    else:
        create_markdown_artifact(_mlflow_markdown(record), key=f"mlflow-{key}",
                                 description="Where this reproduction's MLflow record is")


def _records(table) -> list[dict[str, Any]]:
    """A DataFrame as JSON-safe rows (NaN -> None) for a Prefect table artifact."""
    rows = json.loads(table.to_json(orient="records"))
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows]


def _headline_row(entry: dict[str, Any]) -> dict[str, Any]:
    """One scale of ``summary.json`` as a short, rounded row of the Prefect table."""
    from stages.report import verdict

    r = lambda v, d=2: None if v is None else round(v, d)
    fid, ratio = entry["fid_clf"], entry["fid_clf_ratio"]
    return {"scale": entry["scale"], "params (M)": r(entry["n_params"] / 1e6), "teacher NFE": entry["teacher_nfe"],
            "fid_clf teacher": r(fid["teacher"]), "fid_clf 1-step": r(fid["scm1"]), "fid_clf 2-step": r(fid["scm2"]),
            "ratio 1-step": verdict(ratio["scm1"], "scm1"), "ratio 2-step": verdict(ratio["scm2"], "scm2"),
            "speedup 2-step": r(entry["speedup"]["scm2"], 1)}


EMBED_LIMIT = 2 << 20  # images up to 2 MiB are embedded in the report artifact; larger ones are linked


def _report_markdown(reports: Path, record: tracking.Record) -> str:
    """``report.md`` with its images embedded as data URIs (the Prefect UI cannot open files of the flow's machine)."""
    import base64

    def image(m: re.Match) -> str:
        path = reports / m.group(2)
        if path.is_file() and path.stat().st_size <= EMBED_LIMIT:
            return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"
        return f"[{m.group(1) or m.group(2)}]({path.as_uri()}) (`{path}`)"

    text = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", image, (reports / layout.REPORT).read_text())
    return (f"{text}\n\n---\nThe same files are artifacts of MLflow run `{record.run_id}` "
            f"(`{redact(record.uri)}`, under `report/`).\n")


def _mlflow_markdown(record: tracking.Record) -> str:
    """How to open a local store's record in the MLflow UI."""
    return (f"MLflow run `{record.run_id}` (experiment `{record.experiment_id}`) in `{redact(record.uri)}`.\n\n"
            f"Open it with\n\n```\nmlflow ui --backend-store-uri {redact(record.uri)}\n```\n\nthen "
            f"http://127.0.0.1:5000/#/experiments/{record.experiment_id}/runs/{record.run_id}?{tracking.UI_MODE}\n")


# --------------------------------------------------------------------------------------------------------------
# reproduce


@flow(name="reproduce", flow_run_name=_reproduce_run_name, validate_parameters=True)
def reproduce(profile: str | None = None, overrides: list[str] | dict[str, Any] | None = None,
              scales: list[str] | None = None, project: str | None = None, tracking_uri: str | None = None,
              pull: bool = False, push: bool = False, force: bool = False, parent_run_id: str | None = None,
              label: str | None = None, register_models: bool | None = None) -> dict[str, Any]:
    """Reproduce the study in one DVC project: data -> encode -> classifier -> (teacher -> distill -> sample ->
    evaluate) per scale -> report, recorded in MLflow as it runs and published as Prefect artifacts.

    Args:
        profile: a profile under ``profiles:`` of params.yaml (default: the one params.yaml selects).
        overrides: ``["distill.steps=500", ...]`` (``dvc exp run -S`` syntax) or ``{"distill.steps": 500}``.
        scales: shorthand for the override ``base.scales``.
        project: the project directory (default: the current directory, which must hold dvc.yaml and params.yaml).
        tracking_uri: MLflow store (default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:////<project>/mlflow.db``).
        pull: ``dvc repro --pull`` (fetch missing outputs and run-cache entries from the DVC remote).
        push: ``dvc push --run-cache`` at the end (share the results through the DVC remote).
        force: ``dvc repro --force`` (run every stage even if DVC says it is up to date).
        parent_run_id: nest this reproduction's MLflow run under that run (used by ``sweep``).
        label: a name for this reproduction in MLflow and artifact keys (used by ``sweep``).
        register_models: register the students in the MLflow model registry (default: yes, except for the smoke
            profile).

    The stage tasks depend on each other as in DVC's graph (``wait_for``) and run one at a time (DVC locks the
    workspace). If the flow fails before any stage ran, ``params.yaml`` is restored as it was.
    """
    root = dvc_driver.find_project(project)
    with dvc_driver.flow_lock(root):  # one flow per project: no interleaved params
        params_file = root / "params.yaml"
        before = params_file.read_bytes()
        try:
            cfg, stages, upstream, digest, remote = configure(project, profile, overrides, scales)
            record = open_record(cfg, tracking_uri, parent_run_id, label)
        except BaseException:
            dvc_driver.restore_file(params_file, before)  # nothing ran: the workspace as it was
            raise
        key = dvc_driver.slug(f"{cfg.profile}-{label}" if label else cfg.profile)
        register = cfg.profile != "smoke" if register_models is None else register_models
        runs: dict[str, str] = {}  # scale -> its MLflow child run, opened before the scale's first stage
        futures: dict[str, Any] = {}
        outcomes: list[dict[str, Any]] = []
        failed = None
        try:
            for i, stage in enumerate(stages):
                scale = stage.partition("@")[2]
                if scale and scale not in runs:
                    runs[scale] = tracking.open_scale(record, cfg.project, scale,
                                                      extra_tags={"scm.point": label} if label else None)
                tags = [f"profile:{cfg.profile}", f"stage:{stage.partition('@')[0]}", *([f"scale:{scale}"] if scale else [])]
                future = run_stage.with_options(tags=tags).submit(
                    cfg.project, stage, quote(record.uri), quote(digest), pull=pull, force=force, remote=remote,
                    live=quote((record, runs[scale]) if scale else None), position=f"{i + 1} of {len(stages)}",
                    wait_for=[futures[u] for u in upstream[stage] if u in futures])
                futures[stage] = future
                future.wait()  # one stage at a time: DVC holds the workspace lock while it works
                if not future.state.is_completed():
                    failed = future.state
                    break
                outcome = future.result()
                outcomes.append(outcome)
                if scale:
                    tracking.log_stage(record, runs[scale], stage, seconds=outcome["seconds"],
                                       peak_mib=outcome["peak_mib"], outcome=outcome["outcome"])
            if failed is None:
                if push:
                    push_outputs(cfg.project)
                children = [record_scale(record, cfg, scale, stages, runs.pop(scale), register=register)
                            for scale in cfg.scales]
                tracking.log_headline(record, children)
                table = compare_scales(record, key)
                publish_report(record, cfg, key)
        except BaseException:
            for run_id in runs.values():
                tracking.close_scale(record, run_id, "FAILED")
            tracking.close(record, "FAILED")
            raise
        if failed is not None:
            for run_id in runs.values():
                tracking.close_scale(record, run_id, "FAILED")
            tracking.close(record, "FAILED")
            return Failed(message=failed.message)
        tracking.close(record, "FINISHED")
    return {"project": str(cfg.project), "profile": cfg.profile, "scales": list(cfg.scales),
            "tracking_uri": redact(record.uri), "experiment_id": record.experiment_id, "run_id": record.run_id,
            "run_url": tracking.run_url(record), "reports": str(cfg.project / layout.reports_dir(cfg.profile)),
            "flow_run_url": flow_run.ui_url, "stages": outcomes, "children": children, "table": table}


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
