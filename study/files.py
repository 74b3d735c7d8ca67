"""Files the stages write: atomic outputs, JSON, hashes and provenance.

Outputs are written into a temporary sibling and renamed into place only when complete, so a crash never leaves a
half-written output that DVC could record.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from study import layout
from study.errors import StageError

REPO_ROOT = Path(__file__).resolve().parent.parent


def redact(text: str) -> str:
    """``text`` fit for logs, records and files: the ``user:password@`` of every URL in it replaced by ``***@``.

    Pass credentials to a server through its environment variables (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN),
    not in a URL; if a URL carries them anyway, they never reach a log, a record or an output.
    """
    return re.sub(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@", r"\1***@", text)


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``https://user:pass@host/`` -> (``https://host/``, the MLflow client's credential variables for them).

    The URL without credentials is what becomes a parameter, a log line or a record; the credentials travel in the
    environment (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, which the MLflow client reads).
    """
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    env = {"MLFLOW_TRACKING_USERNAME": unquote(user)} | ({"MLFLOW_TRACKING_PASSWORD": unquote(password)} if password else {})
    return urlunsplit(parts._replace(netloc=host)), env


def project_root() -> Path:
    """The DVC project root: ``$DVC_ROOT`` under ``dvc repro``, else the current directory."""
    return Path(os.environ.get("DVC_ROOT", os.getcwd())).resolve()


def git_commit(cwd: Path | None = None) -> str:
    """The current git commit of the project (with ``-dirty`` when the tree has changes), or ``unknown``."""
    cwd = cwd or project_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None, so that it is valid (strict) JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def read_tensors(path: Path, *, hint: str = "") -> dict[str, Any]:
    """Every tensor of a safetensors file, or a one-line :class:`StageError` naming it (``hint``: what to run)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: not found{f' ({hint})' if hint else ''}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StageError(f"{path}: not a readable safetensors file ({(str(e).splitlines() or [''])[0][:200]})") from None


def write_json(path: Path, obj: Any) -> None:
    """Write strict JSON (NaN and inf as null) atomically: a temporary file in the same directory, then rename."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(strict_json(obj), f, indent=2, sort_keys=False, default=str, allow_nan=False)
            f.write("\n")

    atomic_replace_file(path, write)


# --------------------------------------------------------------------------------------------------------------
# Temporaries: named after their process, given the umask's permissions, cleaned up when their process is gone.


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # read once: os.umask can only be read by setting it


def _temporary_prefix(name: str) -> str:
    """``.<name>.tmp-<pid>-``: the owner's PID in the name lets a later run tell a killed run's leftovers."""
    return f".{name}.tmp-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_leftovers(directory: Path, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` (``.<name>.tmp-<pid>-*``, ``.<name>.old-<pid>``) whose process is gone."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = re.fullmatch(rf"\.{re.escape(name)}\.(?:tmp-(\d+)-.*|old-(\d+))", path.name)
        if match is None:
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid() or _alive(pid):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def atomic_replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``; on failure nothing is left behind.

    The file gets the permissions the umask gives a new file (a temporary file alone would be private, 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path.name), dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~UMASK)
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final`` whole.

    On any exception the temporary directory is removed and ``final`` is left exactly as it was. Leftovers of a
    killed earlier run are removed first; the directory gets the permissions the umask gives a new directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(final.name), dir=final.parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def check_paths(inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Refuse, before anything runs, outputs that would destroy an input or cannot be written.

    ``inputs`` and ``outputs`` map a name for the user (``--latents``) to a path (None: not given). An output may not
    be the project root or ``/``, equal an input, lie inside one or contain one, or overlap another output; the
    directory it goes into must be a writable directory (or creatable inside one).
    """
    resolved = lambda d: {k: (Path(v), Path(v).resolve()) for k, v in d.items() if v is not None}
    ins, outs = resolved(inputs), resolved(outputs)
    for name, (given, out) in outs.items():
        if out == Path(out.anchor) or out == project_root():
            raise StageError(f"{name} {str(given)!r}: the project root or / cannot be an output")
        for other, (other_given, path) in [*ins.items(), *((k, v) for k, v in outs.items() if k != name)]:
            if out == path or path.is_relative_to(out) or out.is_relative_to(path):
                kind = "input" if other in ins else "output"
                raise StageError(f"{name} {str(given)!r}: overlaps the {kind} {other} {str(other_given)!r}")
        ancestor = out.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise StageError(f"{name} {str(given)!r}: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise StageError(f"{name} {str(given)!r}: {ancestor} is not writable")


def write_provenance(out_dir: Path, resolved: dict[str, Any], seconds: dict[str, float] | None = None) -> None:
    """Write the resolved configuration and the run's provenance beside an output, in two files.

    - ``resolved_params.json``: the resolved parameters (credentials redacted). Deterministic, so a re-run that
      computes the same output writes the same bytes, and DVC sees an unchanged output;
    - ``provenance.json``: what changes from run to run without changing the result: the git commit, the torch
      version and the timings. ``.dvcignore`` keeps it out of the output's hash.
    """
    out_dir = Path(out_dir)
    write_json(out_dir / layout.RESOLVED, {"params": _redacted(resolved)})
    write_json(out_dir / layout.PROVENANCE, {"git_commit": git_commit(), "torch": importlib.metadata.version("torch"),
                                      "seconds": {k: round(v, 3) for k, v in (seconds or {}).items()}})


def _redacted(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redacted(v) for v in obj]
    return obj

