"""Fetching pretrained weights: a local path, an http(s) URL with a required sha256, or an MLflow model URI.

Downloads go to a temporary file beside the destination, are hashed while they stream, and are renamed into place
only when the sha256 matches; a mismatch or a broken connection deletes the partial file and fails with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from study.errors import StageError
from study.files import atomic_replace_file, project_root, redact, sha256_file

CHUNK = 1 << 20


MAX_BYTES = 64 << 30  # no model this project reads is larger (EDM2-XXL: 6 GB in float32)
DEADLINE_S = 6 * 3600.0  # a whole download, whatever the per-read timeout: 64 GiB at 3 MB/s


def download(url: str, sha256: str, dest: Path, timeout: float = 30.0, *, max_bytes: int = MAX_BYTES,
             deadline_s: float = DEADLINE_S) -> Path:
    """Download ``url`` to ``dest``, verifying ``sha256`` (required) before the file appears at ``dest``.

    ``timeout`` bounds each read, ``deadline_s`` the whole download and ``max_bytes`` its size (checked against
    Content-Length up front, and while it streams). Errors name the URL without its credentials.
    """
    shown = redact(url)
    sha256 = sha256.strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise StageError(f"{shown}: a download needs its sha256 (64 hex characters), got {sha256!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
    h = hashlib.sha256()
    deadline = time.monotonic() + deadline_s
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            expected = resp.headers.get("Content-Length")
            if expected is not None and int(expected) > max_bytes:
                raise StageError(f"{shown}: {int(expected)} bytes announced, more than the {max_bytes}-byte limit")
            received = 0
            for chunk in iter(lambda: resp.read1(CHUNK), b""):  # read1: one socket read, so the deadline is checked often
                received += len(chunk)
                if received > max_bytes:
                    raise StageError(f"{shown}: more than the {max_bytes}-byte limit; the partial file was deleted")
                if time.monotonic() > deadline:
                    raise StageError(f"{shown}: not complete after {deadline_s:g} s ({received} bytes); "
                                     "the partial file was deleted")
                out.write(chunk)
                h.update(chunk)
        if expected is not None and received != int(expected):
            raise StageError(f"{shown}: truncated download ({received} of {expected} bytes)")
        if h.hexdigest() != sha256:
            raise StageError(f"{shown}: sha256 mismatch (expected {sha256}, got {h.hexdigest()}); the file was deleted")
        os.replace(tmp, dest)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise StageError(f"{shown}: download failed ({redact(str(getattr(e, 'reason', e)))})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def fetch(source: str, sha256: str, dest: Path) -> Path:
    """Make the model named by ``source`` available as the file ``dest`` and return it.

    ``source``: a local file or directory (holding ``model.safetensors``), ``http(s)://...`` (``sha256`` required),
    or an MLflow URI (``models:/name/version``, ``models:/name@alias``, ``runs:/id/path``).
    """
    dest = Path(dest)
    if source.startswith(("http://", "https://")):
        return download(source, sha256, dest)
    if source.startswith(("models:/", "runs:/")):
        import mlflow

        if ".." in source.split("/"):
            raise StageError(f"{source}: '..' in an MLflow URI would read outside the run's or model's artifacts")
        uri = mlflow_store()
        with tempfile.TemporaryDirectory(prefix="scm-mlflow-") as tmp:  # removed whatever happens
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
            except Exception as e:  # MLflow raises many types; all mean "not available"
                raise StageError(f"{source}: MLflow could not provide this model ({str(e).splitlines()[0][:200]})") from None
            if local.is_dir():
                found = sorted(local.rglob("model.safetensors")) or sorted(local.rglob("*.safetensors"))  # the project's file
                if not found:
                    raise StageError(f"{source}: the MLflow artifact holds no .safetensors file")
                local = found[0]
            return _copy_local(str(local), sha256, dest, name=source)
    return _copy_local(source, sha256, dest, name=source)


def offline() -> bool:
    """Whether downloads are off: ``HF_HUB_OFFLINE`` or ``SCM_OFFLINE`` set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "SCM_OFFLINE"))


def hub_snapshot(repo_id: str, revision: str, patterns: list[str], *, who: str) -> Path:
    """The files of hub repository ``repo_id`` at ``revision`` ("" = main) matching ``patterns``, from the Hugging
    Face cache, downloaded into it first unless :func:`offline` (huggingface_hub writes each file atomically and
    checks it against the hub's hash)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns,
                                      local_files_only=offline()))
    except Exception as e:  # huggingface_hub raises many types; all mean "not available"
        how = ("offline (HF_HUB_OFFLINE or SCM_OFFLINE) and not in the Hugging Face cache" if offline()
               else f"download failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]})")
        at = f"@{revision}" if revision else ""
        raise StageError(f"{who}: hub repository {repo_id}{at} unavailable: {how}") from None


def mlflow_store() -> str:
    """The MLflow store a ``models:/`` or ``runs:/`` source is read from: ``$MLFLOW_TRACKING_URI``, else the project's
    own ``mlflow.db`` when it exists (the pipeline's default store). Never a new, empty store in the current directory.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    default = project_root() / "mlflow.db"
    if default.is_file():
        return f"sqlite:///{default}"
    raise StageError(f"an MLflow source needs a store: set MLFLOW_TRACKING_URI (no {default} either)")


def _copy_local(source: str, sha256: str, dest: Path, *, name: str) -> Path:
    """Copy a local model file (or directory holding ``model.safetensors``) to ``dest``, checking ``sha256`` if given.

    The copy goes to a temporary file beside ``dest`` and is renamed into place complete.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise StageError(f"{name}: no such model file or directory")
    if sha256 and sha256_file(path) != sha256.strip().lower():
        raise StageError(f"{name}: sha256 mismatch (expected {sha256.strip().lower()}, got {sha256_file(path)})")
    atomic_replace_file(dest, lambda tmp: shutil.copyfile(path, tmp))
    return dest
