"""``python -m pipeline``: reproduce the study, sweep it, or serve/deploy the flows on a schedule.

  python -m pipeline reproduce --profile default                    # the study: DVC + Prefect + MLflow (make repro)
  python -m pipeline reproduce --profile smoke                      # every stage, every scale; MLflow + artifacts
  python -m pipeline record                                         # MLflow record of a finished plain `dvc repro`
  python -m pipeline reproduce -S distill.steps=3000 --scales cpu-s # overrides as in `dvc exp run -S`
  python -m pipeline sweep --profile smoke -G distill.steps=4,8 -j 2 # isolated copies, 2 at a time
  python -m pipeline serve --cron "0 2 * * *" --profile smoke       # nightly, against `prefect server start`
  python -m pipeline deploy --pool gpu --source https://host/scm.git # to a work pool served by `prefect worker start`
  python -m pipeline export --scale cpu-s                           # the student as a diffusers pipeline folder
  python -m pipeline generate --model exports/cpu-s --n 16 --out gen # PNGs and a grid, same seeds as the sample stage
  python -m pipeline convert-edm edm2-img512-s-fid.pkl --out s.safetensors  # an EDM/EDM2 pickle, no code run

Without PREFECT_API_URL, reproduce and sweep start a temporary Prefect server for the run (no UI afterwards);
with ``prefect server start`` running and PREFECT_API_URL=http://127.0.0.1:4200/api they show in its UI.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path
from typing import Any

from pipeline import generate
from pipeline import project as dvc_driver
from study.errors import StageError
from study.files import split_credentials
from study.params import deep_merge, read_yaml

EXAMPLES = __doc__.split("\n\n")[1]


def _split_top_level(text: str) -> list[str]:
    """``"4,8"`` -> ``["4", "8"]``; ``"[a,b],[c]"`` -> ``["[a,b]", "[c]"]``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["distill.steps=4,8", "distill.lr=[1e-4, 2e-4]"]`` -> ``{"distill.steps": [4, 8], "distill.lr": [...]}``.

    A value in brackets is one YAML list of choices (``base.scales=[[cpu-xs],[cpu-s]]``); otherwise the choices are
    separated by commas outside brackets (``base.scales=[cpu-xs],[cpu-s]``).
    """
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise StageError(f"grid {item!r}: expected key=value1,value2,...")
        key, text = (s.strip() for s in item.split("=", 1))
        values = None
        if text.startswith("["):
            try:
                values = read_yaml(text)
            except yaml.YAMLError:
                values = None
        if not isinstance(values, list):
            values = [read_yaml(v) for v in _split_top_level(text)]
        if not values:
            raise StageError(f"grid {key}: no values")
        grid[key] = values
    return grid


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, help="profile under profiles: in params.yaml (default: the one it selects)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, as `dvc exp run -S` (repeatable), e.g. -S distill.steps=500")
    parser.add_argument("--scales", nargs="+", default=None, metavar="SCALE", help="shorthand for -S base.scales=[...]")
    parser.add_argument("--project", default=None, metavar="DIR",
                        help="the DVC project (default: the current directory; refused if it holds no dvc.yaml and params.yaml)")
    parser.add_argument("--tracking-uri", default=None, metavar="URI",
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:////<project>/mlflow.db)")
    parser.add_argument("--pull", action="store_true", help="dvc repro --pull: fetch missing outputs from the DVC remote")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{reproduce,record,sweep,serve,deploy,export,generate,convert-edm}")

    p = sub.add_parser("reproduce", help="run every stage for every scale through DVC; record in MLflow and Prefect",
                       description="Run data -> encode -> classifier -> (teacher -> distill -> sample -> evaluate) per "
                                   "scale -> report, one Prefect task per stage and scale, each `dvc repro --single-item "
                                   "<stage>`; then log a parent MLflow run with one child per scale and publish Prefect "
                                   "artifacts. The profile and overrides are validated first and written to params.yaml.")
    _common(p)
    p.add_argument("--push", action="store_true", help="dvc push --run-cache at the end (share results via the remote)")
    p.add_argument("--force", action="store_true", help="dvc repro --force: run every stage even if up to date")

    p = sub.add_parser("sweep", help="run variations in parallel, each in its own copy of the project",
                       description="Run the study once per point of a grid (-G) and/or per scale (--scales: one scale "
                                   "per point), each point in an isolated clone of the project (sharing DVC's cache), at "
                                   "most -j at a time, all under one MLflow parent run. The project itself is not modified.")
    _common(p)
    p.add_argument("-G", "--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept parameter and its values (repeatable; points are all combinations), "
                        "e.g. -G distill.steps=500,1000 or -G 'distill.lr=[1e-4, 2e-4]'")
    p.add_argument("-j", "--concurrency", type=int, default=2, help="points running at once (default: 2)")
    p.add_argument("--runs-dir", default=None, metavar="DIR", help="where the copies go (default: <project>/.sweeps)")

    p = sub.add_parser("serve", help="serve the flows on a cron schedule against a Prefect server (long-running)",
                       description="Create the deployments `reproduce/<name>` (on --cron) and `sweep/<name>-sweep` and "
                                   "run their flow runs from this process until interrupted (Ctrl-C pauses the "
                                   "schedule). Needs a persistent API: `prefect server start` (UI on 127.0.0.1:4200) and "
                                   "PREFECT_API_URL=http://127.0.0.1:4200/api. The deployments take `profile` and "
                                   "`overrides` as parameters (defaults from the options below).")
    _common(p)
    p.add_argument("--cron", required=True, help='cron schedule of reproduce, e.g. "0 2 * * *" (02:00 daily)')
    p.add_argument("--timezone", default=None, help="time zone of the cron schedule (default: UTC)")
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.add_argument("-G", "--grid", action="append", default=[], metavar="KEY=V1,V2", help="default grid of the sweep deployment")
    p.add_argument("--sweep-cron", default=None, help="also schedule the sweep deployment")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once from this process (default: 1)")

    p = sub.add_parser("deploy", help="register a flow with a work pool whose workers may run on other machines",
                       description="Create a deployment of a flow on a work pool. Workers (`prefect worker start --pool "
                                   "POOL`) on any machine that reaches the Prefect API fetch the code from --source (a git "
                                   "URL or repository path: each run clones it), run the flow in that clone, pull and push "
                                   "data through the project's DVC remote and log to the MLflow server in --tracking-uri.")
    _common(p)
    p.add_argument("--pool", required=True, help="work pool name (create it: prefect work-pool create POOL --type process)")
    p.add_argument("--source", required=True, help="git URL or local git repository holding this project's code")
    p.add_argument("--branch", default=None, help="git branch of --source (default: its default branch)")
    p.add_argument("--flow", choices=("reproduce", "sweep"), default="reproduce")
    p.add_argument("--name", default="pool", help="deployment name (default: pool)")
    p.add_argument("--cron", default=None, help="optional cron schedule")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the flow runs")
    p.add_argument("--push", action="store_true", help="reproduce: dvc push --run-cache at the end")

    p = sub.add_parser("record", help="record the outputs of a finished `dvc repro` in MLflow (runs no stage)",
                       description="Write the MLflow record that `reproduce` writes (a parent run, a child per scale "
                                   "with the times its stages ran, the students as MLflow models) from the outputs "
                                   "of a plain `dvc repro`. Refused unless `dvc status` is clean (the outputs are the "
                                   "ones dvc.lock names).")
    p.add_argument("--project", default=None, metavar="DIR", help="the DVC project (default: the current directory)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:////<project>/mlflow.db)")
    p.add_argument("--register", action=argparse.BooleanOptionalAction, default=None,
                   help="register the students (default: yes, except for the smoke profile)")

    generate.add_export_parser(sub)
    generate.add_generate_parser(sub)
    generate.add_convert_parser(sub)
    return parser


def _parameters(args: argparse.Namespace) -> dict[str, Any]:
    """Flow parameters from the shared options, validated now (bad input fails before anything starts)."""
    cfg = dvc_driver.configure(args.project, args.profile, args.overrides, args.scales)
    params: dict[str, Any] = {"profile": cfg.profile, "overrides": list(args.overrides), "project": str(cfg.project)}
    if args.scales:
        params["scales"] = list(args.scales)
    if args.tracking_uri:
        # Credentials never become a flow parameter (stored and shown by Prefect): they go to the environment.
        params["tracking_uri"], credentials = split_credentials(args.tracking_uri)
        os.environ.update(credentials)
    if args.pull:
        params["pull"] = True
    return params


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = [k for k in rows[0] if k != "run_id"]
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in keys))


def _api_url() -> str | None:
    """The Prefect API this process talks to (environment, .env, prefect.toml or profile), if any."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def _api_warning() -> None:
    if not _api_url():
        print("note: PREFECT_API_URL is not set, so Prefect starts a temporary server for this process. For the UI and "
              "schedules run `prefect server start` and export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tools = {"export": generate.export_main, "generate": generate.generate_main, "convert-edm": generate.convert_main}
        if args.command in tools:
            return tools[args.command](args)
        if args.command == "record":
            return _record(args)
        params = _parameters(args)
        if args.command == "sweep":
            params.pop("scales", None)
            params.update(grid=parse_grid(args.grid) or None, scales=args.scales, concurrency=args.concurrency,
                          runs_dir=args.runs_dir)
            from pipeline.flows import sweep_points
            for label, point in sweep_points(params["grid"], args.scales):  # validate every point now
                dvc_driver.configure(args.project, args.profile, deep_merge(dvc_driver.parse_overrides(args.overrides),
                                                                            dvc_driver.parse_overrides(point)), None)
        elif args.command == "deploy":
            return _deploy(args, params)
        elif args.command == "serve":
            return _serve(args, params)
        elif args.command == "reproduce":
            params.update(push=args.push, force=args.force)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    _api_warning()
    from pipeline import flows

    flow = flows.sweep if args.command == "sweep" else flows.reproduce
    state = flow(**params, return_state=True)
    if not state.is_completed():
        print(f"error: {args.command} {state.name.lower()}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    _print_table(result.get("table") or [])
    print(f"{args.command}: completed")
    if args.command == "reproduce":
        print(f"  report   {result['reports']}/report.md")
    print(where_to_look(result["tracking_uri"], result["experiment_id"], result["run_id"], result.get("run_url")))
    flow_url = result.get("flow_run_url")
    print(f"  Prefect  {flow_url}" if flow_url and _api_url() else
          "  Prefect  the run was on a temporary server, now stopped; for the UI: `prefect server start` and "
          "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    if args.command == "reproduce" and result["profile"] != "default":
        print(f"  note     params.yaml now selects profile {result['profile']!r}; `python -m pipeline reproduce "
              "--profile default` (or `git checkout params.yaml`) goes back")
    return 0


def where_to_look(uri: str, experiment_id: str, run_id: str, run_url: str | None) -> str:
    """Where the MLflow record is, and how to open it."""
    from pipeline import tracking

    if run_url:
        return f"  MLflow   {run_url}"
    return (f"  MLflow   run {run_id} in {uri}; open the UI with `mlflow ui --backend-store-uri {uri}`, then "
            f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}?{tracking.UI_MODE}")


def _record(args: argparse.Namespace) -> int:
    from pipeline import tracking

    cfg = dvc_driver.configure(args.project, None, None, None)
    stale = dvc_driver.dvc(cfg.project, "status", "--json").strip()
    if stale not in ("", "{}"):
        first = next(iter(json.loads(stale)), "?")
        raise StageError(f"{cfg.project}: outputs differ from dvc.lock (stage {first!r} is not up to date); run "
                         "`dvc repro` first, or `python -m pipeline reproduce`, which records as it runs")
    uri = tracking.tracking_uri(cfg.project, args.tracking_uri)
    stages = dvc_driver.stage_order(cfg.project, cfg.scales)
    register = cfg.profile != "smoke" if args.register is None else args.register
    record, summaries = tracking.record_outputs(cfg.project, uri, cfg.profile, cfg.scales, stages, register=register)
    for s in summaries:
        print(f"record: {s['scale']}: run {s['run_id']}" + (f", model version {s['model_version']}" if s.get("model_version") else ""))
    print(where_to_look(uri, record.experiment_id, record.run_id, tracking.run_url(record)))
    return 0


def _serve(args: argparse.Namespace, params: dict[str, Any]) -> int:
    from prefect import serve

    from pipeline import flows

    if not _api_url():
        print("error: serve needs a persistent Prefect API: run `prefect server start` (UI on http://127.0.0.1:4200) "
              "and export PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
        return 2
    sweep_params = {k: v for k, v in params.items() if k != "scales"}
    grid = parse_grid(args.grid)
    sweep_params.update(grid=grid or None, scales=None if grid else list(dvc_driver.configure(
        args.project, args.profile, args.overrides, args.scales).scales))
    if args.timezone:
        from prefect.schedules import Cron

        schedule_kw: dict[str, Any] = {"schedules": [Cron(args.cron, timezone=args.timezone)]}
    else:
        schedule_kw = {"cron": args.cron}
    sweep_kw: dict[str, Any] = {"cron": args.sweep_cron} if args.sweep_cron else {}
    reproduce = flows.reproduce.to_deployment(name=args.name, parameters=params, **schedule_kw,
                                              description="The study, every stage and scale, through dvc repro.")
    sweep = flows.sweep.to_deployment(name=f"{args.name}-sweep", parameters=sweep_params, **sweep_kw,
                                      description="Variations of the study in isolated copies, in parallel.")
    print(f"serving reproduce/{args.name} (cron {args.cron!r}) and sweep/{args.name}-sweep with parameters "
          f"{json.dumps(params)}; Ctrl-C stops and pauses the schedule", flush=True)
    serve(reproduce, sweep, limit=args.limit)
    return 0


def deploy_to_pool(flow_name: str, pool: str, source: str, *, name: str, parameters: dict[str, Any],
                   branch: str | None = None, cron: str | None = None, env: dict[str, str] | None = None) -> str:
    """Deploy ``pipeline/flows.py:<flow_name>`` from ``source`` to the work pool ``pool``; return the deployment id.

    A URL or a directory holding ``.git`` becomes a :class:`GitRepository`: every flow run clones it at the branch's
    head and runs there (nothing from this machine is needed besides the repository, the DVC remote and MLflow).
    """
    from prefect.runner.storage import GitRepository

    from pipeline import flows

    is_url = "://" in source or source.endswith(".git") or source.startswith("git@")
    if not is_url and not (Path(source) / ".git").exists():
        raise StageError(f"--source {source!r}: expected a git URL or a local git repository")
    storage = GitRepository(url=source if is_url else str(Path(source).resolve()), branch=branch)
    remote = getattr(flows, flow_name).from_source(source=storage, entrypoint=f"pipeline/flows.py:{flow_name}")
    deployment_id = remote.deploy(name=name, work_pool_name=pool, parameters=parameters, cron=cron,
                                  job_variables={"env": env or {}}, build=False, push=False, print_next_steps=False,
                                  ignore_warnings=True)
    return str(deployment_id)


def _deploy(args: argparse.Namespace, params: dict[str, Any]) -> int:
    params.pop("project")  # each worker runs in its own clone of --source
    if args.flow == "reproduce" and args.push:
        params["push"] = True
    bad = next((item for item in args.env if "=" not in item or not item.split("=", 1)[0].strip()), None)
    if bad is not None:
        raise StageError(f"--env {bad!r}: expected KEY=VALUE")
    env = dict(item.split("=", 1) for item in args.env)
    if args.tracking_uri:
        uri, credentials = split_credentials(args.tracking_uri)
        if credentials:
            raise StageError("--tracking-uri: credentials in the URI would be stored in the deployment; give the "
                             "workers MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in their environment instead")
        env.setdefault("MLFLOW_TRACKING_URI", uri)
    deployment_id = deploy_to_pool(args.flow, args.pool, args.source, name=args.name, parameters=params,
                                   branch=args.branch, cron=args.cron, env=env)
    print(f"deployed {args.flow}/{args.name} ({deployment_id}) to work pool {args.pool!r}; start workers with "
          f"`prefect worker start --pool {args.pool}` and runs with `prefect deployment run {args.flow}/{args.name}`")
    return 0
