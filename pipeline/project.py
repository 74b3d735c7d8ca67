"""One DVC project directory as the flows see it: its params, its stages in order, and isolated copies of it.

Nothing here imports Prefect or MLflow. The flows (``pipeline/flows.py``) call these functions from their tasks:

- :func:`configure` validates a profile, ``key=value`` overrides and scales with the stages' own loader
  (``study.params.load``, which also checks the scales) *before anything runs*; :func:`write_params` then
  records them in ``params.yaml`` the way ``dvc exp run -S`` does, so that DVC sees every value a stage will read.
- :func:`stage_order` asks DVC for the stage graph and orders it the way the study reads: shared stages, then every
  per-scale stage of the first scale of ``base.scales``, then the next scale, then the report.
- :func:`repro_stage` runs ``dvc repro --single-item <stage>`` in the project and streams its output, line by line,
  to a callback (the Prefect run logger). DVC decides whether the stage runs, is skipped (``dvc.lock`` matches) or is
  restored from its run cache; ``dvc.lock`` is updated either way.
- :func:`isolate` makes a private working copy of the project for one sweep point: a ``git clone`` of the project,
  its uncommitted changes copied over, and DVC's cache shared with the project.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import TELEMETRY_OFF
from study import params as study_params
from study.errors import StageError
from study.files import sha256_file

# The order in which the study reads: shared stages, then each scale's chain, then the cross-scale report.
SHARED_STAGES = ("data", "encode", "classifier")
SCALE_STAGES = ("teacher", "distill", "sample", "evaluate")
FINAL_STAGES = ("report",)

# Written by the flows under a project, never part of an isolated copy.
LOCAL_STATE = (".sweeps", "mlflow.db", "mlartifacts", "mlruns", ".prefect", "checkpoints")

Overrides = list[str] | dict[str, Any] | None


# --------------------------------------------------------------------------------------------------------------
# The project directory.


def find_project(project: str | Path | None = None) -> Path:
    """The project directory: ``project`` if given, else the current directory.

    A directory qualifies if it holds ``dvc.yaml`` and ``params.yaml``. There is no fallback to the installed
    checkout: a command run elsewhere would silently work on (and write into) a project the user is not looking at.
    """
    path = Path(project if project is not None else Path.cwd()).expanduser().resolve()
    if (path / "dvc.yaml").is_file() and (path / "params.yaml").is_file():
        return path
    hint = "" if project is not None else "; cd into the project or pass --project DIR"
    raise StageError(f"project {str(path)!r}: not a project directory (no dvc.yaml and params.yaml there){hint}")


def subprocess_env(tracking_uri: str | None = None) -> dict[str, str]:
    """The environment of every stage subprocess.

    The interpreter running the flow comes first on ``PATH`` (``dvc.yaml`` commands say ``python -m stages...``),
    telemetry is off, output is unbuffered so logs stream, and ``MLFLOW_RUN_ID`` is never passed on: it would
    override any explicit parent run in a child process (mlflow/mlflow#15713). ``MLFLOW_TRACKING_URI`` is the flow's,
    so a ``teacher.source: models:/name/version`` is fetched from the same registry the flow writes to.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env.update(TELEMETRY_OFF)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


# --------------------------------------------------------------------------------------------------------------
# Configuration: validate first, then record in params.yaml.


@dataclass(frozen=True)
class Configuration:
    """A validated request: the profile, the overrides as a nested mapping, and what they resolve to."""

    project: Path
    profile: str
    overrides: dict[str, Any]
    params: study_params.Params
    scales: tuple[str, ...]


def params_digest(project: Path) -> str:
    """sha256 of the project's ``params.yaml``: what every stage of a flow must still read."""
    return sha256_file(Path(project) / "params.yaml")


def check_params_unchanged(project: Path, digest: str, stage: str) -> None:
    """Refuse to run ``stage`` when ``params.yaml`` changed since the flow configured it (the study would mix)."""
    if params_digest(project) != digest:
        raise StageError(f"{Path(project) / 'params.yaml'}: changed since this flow configured it; {stage} not run "
                         "(a flow's stages must all read one configuration: start a new flow)")


@contextlib.contextmanager
def flow_lock(project: Path) -> Iterator[None]:
    """Hold the project's flow lock: one flow per project at a time (a second one fails at once, naming the first)."""
    import fcntl

    path = Path(project) / ".dvc" / "tmp" / "scm-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StageError(f"{project}: another flow is running on this project ({holder}); wait for it to end, "
                             "or run in a clone (as sweep does)") from None
        f.seek(0)
        f.truncate()
        f.write(f"PID {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def restore_file(path: Path, content: bytes) -> None:
    """Put ``content`` back into ``path`` (atomically) if it differs."""
    if path.read_bytes() != content:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_bytes(content)
        os.replace(tmp, path)


def parse_overrides(overrides: Overrides) -> dict[str, Any]:
    """``["distill.steps=4"]`` or ``{"distill.steps": 4}`` or ``{"distill": {"steps": 4}}`` -> nested mapping."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        nested: dict[str, Any] = {}
        for key, value in overrides.items():
            parts = str(key).split(".")
            node = nested
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise StageError(f"override {key!r}: {p} is both a value and a section")
            if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
                node[parts[-1]] = study_params.deep_merge(node[parts[-1]], value)
            else:
                node[parts[-1]] = copy.deepcopy(value)
        return nested
    if isinstance(overrides, str):
        overrides = [overrides]
    return study_params.parse_overrides(list(overrides))


def _raw_params(project: Path) -> dict[str, Any]:
    path = project / "params.yaml"
    try:
        raw = study_params.read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise StageError(f"{path}: expected a mapping at the top level")
    return raw


def configure(project: str | Path | None, profile: str | None = None, overrides: Overrides = None,
              scales: list[str] | tuple[str, ...] | None = None) -> Configuration:
    """Validate a request against the project's ``params.yaml`` without changing anything.

    Raises :class:`StageError` naming the offending profile, key or scale. ``scales`` is shorthand for the override
    ``base.scales``. The profile defaults to the one ``params.yaml`` selects.
    """
    project = find_project(project)
    nested = parse_overrides(overrides)
    if scales is not None:
        if isinstance(scales, str) or not scales:
            raise StageError(f"scales: expected a non-empty list of scale names, got {scales!r}")
        nested = study_params.deep_merge(nested, {"base": {"scales": list(scales)}})
    if "profile" in nested:
        raise StageError("profile: choose it with the profile parameter (--profile), not as an override")
    raw = _raw_params(project)
    profile = profile if profile is not None else raw.get("profile", "default")
    params = study_params.load(project / "params.yaml", profile, nested)  # checks base.scales too
    # dvc.yaml expands the per-scale stages from the *top-level* base.scales; the stages resolve the profile's.
    expanded = nested.get("base", {}).get("scales", (raw.get("base") or {}).get("scales"))
    if expanded is not None and list(expanded) != list(params.base.scales):
        raise StageError(
            f"base.scales: profile {profile!r} resolves to {list(params.base.scales)} but dvc.yaml expands its per-scale "
            f"stages from the top-level base.scales {list(expanded)}; pass -S 'base.scales=[{','.join(params.base.scales)}]'")
    return Configuration(project, params.profile, nested, params, tuple(params.base.scales))


def _set_path(node: Any, keys: list[str], value: Any) -> None:
    """Set ``node[k0][k1]...`` in a ruamel round-trip mapping, creating sections as needed (lists in flow style)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = CommentedMap()
        node = node[k]
    if isinstance(value, (list, tuple)):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        value = seq
    node[keys[-1]] = value


def _has_path(node: Any, keys: list[str]) -> bool:
    for k in keys:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


def _leaves(nested: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[list[str], Any]]:
    out = []
    for k, v in nested.items():
        if isinstance(v, dict) and v:
            out += _leaves(v, (*prefix, k))
        else:
            out.append(([*prefix, k], v))
    return out


def write_params(cfg: Configuration) -> bool:
    """Record the profile and overrides in ``params.yaml`` (comments and layout kept); return whether it changed.

    Where the values go, so that every stage reads exactly ``cfg.params``:

    - ``profile: <name>`` at the top;
    - an override of a key that the selected profile sets goes into ``profiles.<name>`` (a top-level value would be
      shadowed by the profile's); any other override goes into its top-level section, so DVC invalidates only the
      stages that read that section (every stage reads ``profiles``);
    - ``base.scales`` always (also) at the top level: dvc.yaml's ``foreach`` expands the per-scale stages from it.
    """
    import io

    from ruamel.yaml import YAML

    path = cfg.project / "params.yaml"
    rt = YAML()  # round-trip: comments, order and flow style survive
    rt.preserve_quotes = True
    rt.width = 4096
    text = path.read_text()
    doc = rt.load(text)
    doc["profile"] = cfg.profile
    selected = (doc.get("profiles") or {}).get(cfg.profile) or {} if cfg.profile != "default" else {}
    for keys, value in _leaves(cfg.overrides):
        value = list(value) if isinstance(value, tuple) else value
        in_profile = _has_path(selected, keys)
        if in_profile:
            _set_path(doc, ["profiles", cfg.profile, *keys], copy.deepcopy(value))
        if not in_profile or keys == ["base", "scales"]:
            _set_path(doc, keys, copy.deepcopy(value))
    buf = io.StringIO()
    rt.dump(doc, buf)
    if buf.getvalue() == text or study_params.read_yaml(buf.getvalue()) == study_params.read_yaml(text):
        return False  # nothing to record: the file stays as written (ruamel would re-wrap long flow mappings)
    written = study_params.resolve(study_params.read_yaml(buf.getvalue()))
    if written.to_dict() != cfg.params.to_dict():  # an invariant of the placement rules above
        raise AssertionError("params.yaml as written does not resolve to the requested configuration")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
    return True


# --------------------------------------------------------------------------------------------------------------
# The stages, in the order the study reads.


def stage_order(project: Path, scales: tuple[str, ...]) -> list[str]:
    """Every stage of ``dvc.yaml`` for these scales, dependencies first, scale by scale.

    The graph is DVC's own (so a stage added to ``dvc.yaml`` is run too); ties are broken by the study's order.
    """
    return stage_graph(project, scales)[0]


def _dvc_graph(project: Path):
    """DVC's stage graph as a networkx DiGraph with edges from a stage to the stages that depend on it."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.name for stage in graph.nodes}
        deps = nx.DiGraph([(names[b], names[a]) for a, b in graph.edges])
        deps.add_nodes_from(names.values())
    return deps


def stage_graph(project: Path, scales: tuple[str, ...]) -> tuple[list[str], dict[str, list[str]]]:
    """:func:`stage_order`, and each stage's direct upstream stages in DVC's graph (what the Prefect graph draws)."""
    import networkx as nx

    deps = _dvc_graph(project)
    known = [*SHARED_STAGES, *SCALE_STAGES, *FINAL_STAGES]
    missing = [f"{s}@{x}" for x in scales for s in SCALE_STAGES if f"{s}@{x}" not in deps]
    if missing:
        raise StageError(f"dvc.yaml has no stage {missing[0]!r} (its foreach does not expand base.scales {list(scales)})")

    def key(name: str) -> tuple:
        stage, _, scale = name.partition("@")
        group = 0 if not scale and stage in SHARED_STAGES else 2 if not scale else 1
        return (group, scales.index(scale) if scale in scales else len(scales),
                known.index(stage) if stage in known else len(known), name)

    order = list(nx.lexicographical_topological_sort(deps, key=key))
    # Per-scale stages of scales that are not requested (a stale foreach) are left alone.
    order = [n for n in order if "@" not in n or n.partition("@")[2] in scales]
    return order, {n: sorted(u for u in deps.predecessors(n) if u in order) for n in order}


def task_name(stage: str) -> str:
    """``teacher@cpu-s`` -> ``teacher-cpu-s``: the Prefect task run name of a stage."""
    return stage.replace("@", "-")


# --------------------------------------------------------------------------------------------------------------
# Running one stage through DVC.


class StageFailed(Exception):
    """A stage (or DVC around it) failed. ``transient`` says whether retrying can help."""

    def __init__(self, stage: str, message: str, *, returncode: int, transient: bool) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage, self.returncode, self.transient = stage, returncode, transient


# Failures that another attempt can fix: another DVC command holding the workspace or a stage's lock, a busy SQLite
# file, a process killed from outside (signal, out-of-memory killer).
TRANSIENT = re.compile(r"Unable to acquire lock|is busy, it is being blocked by|database is locked|"
                       r"exited with -\d+|exited with 13[47]\b|Connection (refused|reset)|Temporary failure|timed out",
                       re.IGNORECASE)
OUTCOMES = (("ran", re.compile(r"^Running stage '")),
            ("restored", re.compile(r"is cached - skipping run")),
            ("pulled", re.compile(r"^Pulling data for stage")),
            ("skipped", re.compile(r"didn't change, skipping")))


@dataclass
class StageResult:
    stage: str
    outcome: str  # ran | restored (from the run cache) | pulled (from the DVC remote) | skipped (up to date)
    seconds: float
    tail: list[str] = field(default_factory=list)


def stream(cmd: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None], *,
           progress_every: float = 10.0, keep: int = 200) -> tuple[int, list[str]]:
    """Run ``cmd`` and pass every output line to ``log``; return the exit code and the last ``keep`` lines.

    stdout and stderr are merged in order. Progress bars redraw with a carriage return: one redraw in
    ``progress_every`` seconds is logged, and the final state of each bar (it ends with a newline).
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    assert proc.stdout is not None
    tail: deque[str] = deque(maxlen=keep)
    pending, last_progress = b"", 0.0
    try:
        while chunk := os.read(proc.stdout.fileno(), 65536):
            pending += chunk
            while (m := re.search(rb"[\r\n]", pending)) is not None:
                line, sep, pending = pending[:m.start()], pending[m.start():m.end()], pending[m.end():]
                text = line.decode(errors="replace").rstrip()
                if not text:
                    continue
                if sep == b"\r":  # a progress-bar redraw
                    now = time.monotonic()
                    if now - last_progress < progress_every:
                        continue
                    last_progress = now
                tail.append(text)
                log(text)
        if pending.strip():
            text = pending.decode(errors="replace").rstrip()
            tail.append(text)
            log(text)
    except BaseException:  # cancelled or interrupted: do not leave DVC running (and holding the repo lock)
        proc.terminate()
        raise
    finally:
        returncode = proc.wait()
    return returncode, list(tail)


def failure_message(lines: list[str], returncode: int) -> str:
    """The stage's own last ``error: ...`` line, else DVC's ``ERROR: ...`` line, else the last output line."""
    for prefix in ("error: ", "ERROR: "):
        for line in reversed(lines):
            if line.startswith(prefix):
                return line
    return lines[-1] if lines else f"exited with {returncode}"


# DVC's lines that say nothing the flow does not say better: its push hint (shown only with a remote), its repeat of
# the stage's error, and its support link.
NOISE = re.compile(r"^Use `dvc push` to send your updates|^ERROR: failed to reproduce|^Having any troubles\?")
PUSH_HINT = re.compile(r"^Use `dvc push` to send your updates")


def has_remote(project: Path) -> bool:
    """Whether the project has a default DVC remote (``core.remote``)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return bool(repo.config.get("core", {}).get("remote"))


def repro_stage(project: Path, stage: str, *, log: Callable[[str], None], env: dict[str, str],
                pull: bool = False, force: bool = False, remote: bool = False) -> StageResult:
    """``dvc repro --single-item <stage>`` in ``project``; raise :class:`StageFailed` with the stage's error line.

    ``--single-item`` makes DVC look at this stage only: the flow has already brought its upstream stages up to
    date, in dependency order. DVC still decides whether the stage runs, is restored from the run cache or is skipped.
    The stage's ``error:`` line becomes the exception's message and is not logged as well (shown once); DVC's push
    hint is logged only when the project has a ``remote``.
    """
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    if pull:
        cmd.append("--pull")
    if force:
        cmd.append("--force")
    start = time.perf_counter()

    def shown(line: str) -> None:
        if line.startswith("error: ") or (NOISE.search(line) and not (remote and PUSH_HINT.search(line))):
            return
        log(line)

    returncode, lines = stream(cmd, project, env, shown)
    if returncode != 0:
        text = "\n".join(lines)
        raise StageFailed(stage, failure_message(lines, returncode), returncode=returncode,
                          transient=bool(TRANSIENT.search(text)))
    outcome = next((name for name, pattern in OUTCOMES for line in lines if pattern.search(line)), "skipped")
    return StageResult(stage, outcome, time.perf_counter() - start, lines[-20:])


def dvc(project: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """A DVC command in ``project`` that must succeed; its output."""
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env or subprocess_env(),
                         capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stdout + res.stderr).strip().splitlines()
        raise StageError(f"dvc {' '.join(args)}: {failure_message(lines, res.returncode)}")
    return res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------------------
# Isolated copies for sweeps.


def _git(cwd: Path, *args: str) -> str:
    res = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise StageError(f"git {' '.join(args)} in {cwd}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return res.stdout


def isolate(project: Path, dest: Path, cache_dir: str | None = None) -> Path:
    """A private working copy of ``project`` at ``dest`` for one sweep point; returns ``dest``.

    - ``git clone --local`` of the project (objects hard-linked, same commit), so the copy has its own ``dvc.lock``,
      outputs and DVC repo lock, and stages still record the project's commit as their provenance;
    - the project's uncommitted changes (modified and untracked, not ignored files) copied over and its deleted
      files removed, so the copy runs the code as it is in the workspace, not as last committed;
    - DVC's cache shared with the project (``dvc cache dir --local``): outputs the project or another point already
      produced are restored from the run cache instead of recomputed, and the copy's results land in the project's
      cache (``dvc exp run --temp`` does the same).
    """
    from dvc.repo import Repo

    project, dest = Path(project).resolve(), Path(dest).resolve()
    if dest.exists():
        raise StageError(f"{dest}: already exists (each sweep point needs a fresh directory)")
    if not (project / ".git").exists():
        raise StageError(f"{project}: a sweep needs the project to be a git repository with at least one commit")
    if not _git(project, "rev-list", "-n1", "--all").strip():
        raise StageError(f"{project}: a sweep needs at least one git commit (git add -A && git commit)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _git(dest.parent, "clone", "--quiet", "--local", "--no-checkout", str(project), dest.name)
    head = _git(project, "rev-parse", "HEAD").strip()
    _git(dest, "checkout", "--quiet", "--detach", head)

    # The workspace as it is: modified and untracked (not ignored) files, deletions.
    changed = _git(project, "ls-files", "-z", "--modified", "--others", "--exclude-standard").split("\0")
    deleted = set(_git(project, "ls-files", "-z", "--deleted").split("\0"))
    for rel in filter(None, changed):
        if rel.split("/", 1)[0] in LOCAL_STATE or rel in deleted:
            continue
        src, dst = project / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for rel in filter(None, deleted):
        (dest / rel).unlink(missing_ok=True)

    # One DVC cache (and run cache) for the project and all its copies; remotes and local settings as the project's.
    if (project / ".dvc" / "config.local").is_file():
        shutil.copy2(project / ".dvc" / "config.local", dest / ".dvc" / "config.local")
    if cache_dir is None:
        with Repo(str(project)) as repo:
            cache_dir = repo.cache.local_cache_dir
    dvc(dest, "cache", "dir", "--local", str(cache_dir))
    return dest


# --------------------------------------------------------------------------------------------------------------
# Small helpers shared by the flows.


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"teacher": {"lr": 1e-3}}`` -> ``{"teacher.lr": 1e-3}``; lists stay values."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def slug(text: str, limit: int = 60) -> str:
    """Lowercase letters, digits and dashes only (Prefect artifact keys, directory names)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:limit] or "run"


def describe(overrides: dict[str, Any]) -> str:
    """``{"distill": {"steps": 4}}`` -> ``distill.steps=4`` (for run names and labels)."""
    return ",".join(f"{k}={format_value(v)}" for k, v in flatten(overrides).items())


def format_value(value: Any) -> str:
    """``["cpu-xs", "cpu-s"]`` -> ``[cpu-xs,cpu-s]``, as it would be written after ``-S key=``."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)
