"""Training checkpoints: the whole training state, written atomically, read back without unpickling anything.

A checkpoint is one safetensors file. Its tensors are every tensor of the training state (network, w_φ head, EMA,
optimiser moments, RNG states, the minibatch order); its metadata holds the JSON of everything else (step, history,
optimiser hyper-parameters) and a fingerprint of the run: the parameters, the inputs' hashes, the hash of the
stage's code and the torch version. Loading therefore runs no code, and a checkpoint of another run (other
parameters, other data, another scale, other code) is never resumed.

Where: ``<base.checkpoint_dir>/<stage>-<scale>/`` under the project, outside every DVC output (DVC deletes a stage's
outputs before running it) and ignored by git and DVC. ``last.safetensors`` is replaced atomically: written to a
temporary file, flushed to disk, then renamed; the one it replaces is kept as ``prev.safetensors``. A kill at any
moment therefore leaves a complete ``last`` or, between the two renames, a complete ``prev``. The directory is removed
once the stage's outputs are written.

Fault injection for tests: ``SCM_FAILPOINT=<point>:<n>`` kills the process (SIGKILL) the n-th time it reaches
``<point>``: ``step`` (before a training step), ``checkpoint-tmp`` (the new checkpoint written, not yet renamed) or
``checkpoint-swap`` (``last`` moved to ``prev``, the new one not yet in place).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from study.files import project_root, sha256_file
from study.imports import code_hash
from study.params import to_plain


LAST, PREV = "last.safetensors", "prev.safetensors"

# ---------------------------------------------------------------------------------------------------------------
# Fault injection (tests only; off unless SCM_FAILPOINT is set).

_hits: Counter[str] = Counter()


def failpoint(point: str) -> None:
    """SIGKILL this process the n-th time ``point`` is reached, when ``SCM_FAILPOINT=<point>:<n>``."""
    spec = os.environ.get("SCM_FAILPOINT", "")
    if not spec.startswith(point + ":"):
        return
    _hits[point] += 1
    if _hits[point] == int(spec.rsplit(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# A nested state (dicts, lists, tensors, numbers, strings) <-> safetensors tensors + a JSON skeleton.


def flatten(tree: Any, path: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in ``tree`` by ``{"__tensor__": path}``; return the skeleton and the tensors by path.

    Dicts with non-string keys (an optimiser's per-parameter state) become ``{"__items__": [[key, value], ...]}`` and
    tuples ``{"__tuple__": [...]}``, so that the state comes back with the same types.
    """
    if isinstance(tree, torch.Tensor):
        return {"__tensor__": path}, {path: tree.detach().cpu().contiguous()}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(tree, dict):
        items = []
        for k, v in tree.items():
            skeleton, sub = flatten(v, f"{path}/{k}")
            tensors |= sub
            items.append([k, skeleton])
        if all(isinstance(k, str) and not k.startswith("__") for k in tree):
            return dict(items), tensors
        return {"__items__": items}, tensors
    if isinstance(tree, (list, tuple)):
        out = []
        for i, v in enumerate(tree):
            skeleton, sub = flatten(v, f"{path}/{i}")
            tensors |= sub
            out.append(skeleton)
        return (out if isinstance(tree, list) else {"__tuple__": out}), tensors
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree, tensors
    raise TypeError(f"cannot checkpoint a {type(tree).__name__} at {path or '/'}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__items__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def fingerprint(**parts: Any) -> str:
    """A short hash of what makes a run this run (parameters, input hashes, scale)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_mismatch(found: Any, expected: Any, path: str = "") -> str | None:
    """Why ``found`` does not fit ``expected`` (a key missing, a tensor of another shape or dtype), or None.

    Mappings must hold every key of ``expected`` and no other (an empty ``expected`` mapping stands for contents that
    vary, such as an optimiser's state); lists must have its length; tensors its shape and dtype. ``None`` in
    ``expected`` accepts anything; other values may differ.
    """
    where = path or "/"
    if expected is None:
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(found, torch.Tensor):
            return f"{where}: not a tensor"
        if found.shape != expected.shape or found.dtype != expected.dtype:
            return (f"{where}: {found.dtype} {tuple(found.shape)}, this run has {expected.dtype} "
                    f"{tuple(expected.shape)}")
        return None
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            return f"{where}: not a mapping"
        missing = [k for k in expected if k not in found]
        if missing:
            return f"{path}/{missing[0]}: missing"
        if expected and set(found) - set(expected):
            return f"{path}/{sorted(map(str, set(found) - set(expected)))[0]}: not in this run"
        return next((m for k, v in expected.items() if (m := state_mismatch(found[k], v, f"{path}/{k}"))), None)
    if isinstance(expected, (list, tuple)):
        if not isinstance(found, (list, tuple)) or len(found) != len(expected):
            return f"{where}: {len(found) if isinstance(found, (list, tuple)) else 'no'} entries, this run has {len(expected)}"
        return next((m for i, (a, b) in enumerate(zip(found, expected)) if (m := state_mismatch(a, b, f"{path}/{i}"))), None)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Save and restore.


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(directory: Path, state: dict[str, Any], run_fingerprint: str) -> Path:
    """Write ``state`` as ``directory/last.safetensors`` atomically, keeping the previous one as ``prev``."""
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten(state)
    meta = {"fingerprint": run_fingerprint, "state": json.dumps(skeleton)}
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        failpoint("checkpoint-tmp")
        last = directory / LAST
        if last.exists():
            os.replace(last, directory / PREV)
            failpoint("checkpoint-swap")
        os.replace(tmp, last)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return last


def read_checkpoint(path: Path, run_fingerprint: str) -> tuple[dict[str, Any] | None, str]:
    """The state in ``path``, or None and why not (unreadable, or written by a different run)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        skeleton = json.loads(meta["state"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    if meta.get("fingerprint") != run_fingerprint:
        return None, f"{path}: written by a run with other parameters or inputs; starting afresh"
    return unflatten(skeleton, tensors), f"{path}"


@dataclass
class Checkpointer:
    """Periodic checkpoints of one training run in ``directory``; ``every`` steps (0 = never)."""

    directory: Path | None
    every: int
    run_fingerprint: str
    notes: list[str] = field(default_factory=list)  # what restore() found and did, for the stage to print

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.every > 0

    def restore(self, expected: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The newest good checkpoint of this run (``last``, else ``prev``), or None.

        With ``expected`` (the state this run would save, or the part of it whose structure is fixed), a checkpoint
        whose state does not fit it (a missing key, another shape or dtype: :func:`state_mismatch`) is ignored like
        an unreadable one, so restoring never fails half-way.
        """
        if not self.enabled or not self.directory.is_dir():
            return None
        for stale in self.directory.glob(".ckpt-*.tmp"):  # a write that was killed before its rename
            stale.unlink(missing_ok=True)
        for name in (LAST, PREV):
            path = self.directory / name
            if path.is_file():
                state, why = read_checkpoint(path, self.run_fingerprint)
                if state is not None and expected is not None:
                    mismatch = state_mismatch(state, expected)
                    if mismatch is not None:
                        state, why = None, f"{path}: does not fit this run ({mismatch}); starting afresh"
                if state is not None:
                    self.notes.append(f"resuming from {path} at step {state.get('step')}")
                    return state
                self.notes.append(f"ignoring {why}")
        return None

    def keep_before(self, step: int) -> Path | None:
        """Delete this run's checkpoints taken at ``step`` or later; return the newest one kept (or None).

        After a streak of non-finite steps that began at ``step``, the weights saved from then on may already hold
        the update that diverged; a resumed run must start from before it.
        """
        if not self.enabled or not self.directory.is_dir():
            return None
        kept = None
        for name in (LAST, PREV):
            path = self.directory / name
            if not path.is_file():
                continue
            state, _ = read_checkpoint(path, self.run_fingerprint)
            if state is None or state["step"] >= step:
                path.unlink()
            elif kept is None:
                kept = path
        if kept is not None and kept.name == PREV:
            os.replace(kept, self.directory / LAST)
            kept = self.directory / LAST
        return kept

    def due(self, steps_done: int, total_steps: int) -> bool:
        return self.enabled and steps_done % self.every == 0 and steps_done < total_steps

    def save(self, state_fn: Callable[[], dict[str, Any]]) -> Path:
        assert self.directory is not None
        return write_checkpoint(self.directory, state_fn(), self.run_fingerprint)

    def clear(self) -> None:
        """Remove this run's checkpoints (its outputs are written), and the checkpoint root if left empty."""
        if self.directory is None or not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            path.unlink(missing_ok=True)
        self.directory.rmdir()
        with contextlib.suppress(OSError):  # not empty: other runs' checkpoints live there
            self.directory.parent.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# One run's checkpointer, as the stages make it.

# Parameters that a run may change and still resume its checkpoint: those that do not change what is computed, and
# the learning rate, which is a function of the step (no scheduler state), so that a run stopped by a non-finite
# streak can resume from before the streak with a lower one, as its error message advises.
RESUMABLE_CHANGES = ("checkpoint_every", "batch_per_device", "max_nonfinite_steps", "log_every", "lr")


def checkpoint_root(base: Any) -> Path | None:
    """``base.checkpoint_dir`` under the project root, or None when checkpoints are off."""
    return project_root() / base.checkpoint_dir if base.checkpoint_dir else None


def run_checkpointer(root: Path | None, name: str, every: int, *, stage: str, params: Any, base: Any,
                     inputs: Sequence[Path]) -> Checkpointer:
    """The checkpointer of run ``name`` (``teacher-cpu-s``) of ``stages.<stage>``, in ``root/name``.

    Its fingerprint holds everything that makes the run this run: the parameters, the inputs' hashes, the hash of the
    code the stage runs (:func:`study.imports.code_hash`: an edit of any file the stage imports starts afresh) and the
    torch version.
    """
    run = {k: v for k, v in to_plain(params).items() if k not in RESUMABLE_CHANGES}
    key = fingerprint(name=name, params=run, seed=base.seed, sigma_data=base.sigma_data, precision=base.precision,
                      inputs=[sha256_file(p) for p in inputs], code=code_hash(f"stages.{stage}"),
                      torch=torch.__version__)
    return Checkpointer(root / name if root is not None else None, every, key)
