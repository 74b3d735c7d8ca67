"""study/checkpoint.py: the training state round-trips through safetensors + JSON exactly; writes are atomic and keep
the previous checkpoint; a damaged, foreign or pickled file is never resumed (and never unpickled)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from study.checkpoint import LAST, PREV, Checkpointer, flatten, read_checkpoint, unflatten, write_checkpoint


def _net_and_adam(steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(steps):
        _adam_step(net, opt)
    return net, opt


def _adam_step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    net(torch.linspace(-1, 1, 15).view(5, 3)).square().mean().backward()
    opt.step()


def _trained_state() -> dict:
    """A realistic state: a net, its Adam moments after two steps, RNG states, a history with a NaN."""
    net, opt = _net_and_adam(2)
    return {"step": 2, "net": net.state_dict(), "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "extra": [torch.zeros(1)], "history": [{"step": 0, "loss": 1.5}, {"step": 1, "loss": float("nan")}],
            "note": None, "flag": True}


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)  # same keys, same order, same key types (an optimiser's state uses int keys)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_flatten_unflatten_is_exact():
    state = _trained_state()
    skeleton, tensors = flatten(state)
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    assert "/net/0.weight" in tensors and any(k.startswith("/optimizer/state/0/") for k in tensors)
    _assert_same(state, unflatten(skeleton, tensors))
    with pytest.raises(TypeError, match="cannot checkpoint a object at /x"):
        flatten({"x": object()})


def test_a_restored_optimizer_takes_the_same_next_step(tmp_path: Path):
    state = _trained_state()
    write_checkpoint(tmp_path, state, "run-a")
    restored, note = read_checkpoint(tmp_path / LAST, "run-a")
    assert note == str(tmp_path / LAST)
    _assert_same(state, restored)

    original, original_opt = _net_and_adam(2)
    _adam_step(original, original_opt)
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    net.load_state_dict(restored["net"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    opt.load_state_dict(restored["optimizer"])
    _adam_step(net, opt)
    for a, b in zip(original.parameters(), net.parameters()):
        assert torch.equal(a, b)


def test_writes_keep_the_previous_checkpoint_and_leave_no_temporary_file(tmp_path: Path):
    for step in (5, 10, 15):
        write_checkpoint(tmp_path, {"step": step, "w": torch.full((2,), float(step))}, "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST, PREV]
    assert read_checkpoint(tmp_path / LAST, "run")[0]["step"] == 15
    assert read_checkpoint(tmp_path / PREV, "run")[0]["step"] == 10


def test_restore_falls_back_to_prev_and_cleans_up(tmp_path: Path):
    ck = Checkpointer(tmp_path / "teacher-x", every=5, run_fingerprint="run")
    assert ck.restore() is None  # nothing yet
    ck.save(lambda: {"step": 5})
    ck.save(lambda: {"step": 10})
    last = ck.directory / LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a damaged newest file
    (ck.directory / ".ckpt-abc.tmp").write_bytes(b"half a write")  # a write killed before its rename
    state = ck.restore()
    assert state == {"step": 5}
    assert ck.notes[0].startswith(f"ignoring {ck.directory / LAST}: unreadable")
    assert ck.notes[1] == f"resuming from {ck.directory / PREV} at step 5"
    assert not (ck.directory / ".ckpt-abc.tmp").exists()
    ck.clear()
    assert not ck.directory.exists() and not tmp_path.exists()  # the empty root goes too


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path: Path):
    Checkpointer(tmp_path, 5, "params-A").save(lambda: {"step": 5})
    other = Checkpointer(tmp_path, 5, "params-B")
    assert other.restore() is None
    assert "other parameters or inputs" in other.notes[0]


def test_disabled_checkpointer_never_writes(tmp_path: Path):
    assert not Checkpointer(None, 5, "x").enabled and Checkpointer(None, 5, "x").restore() is None
    ck = Checkpointer(tmp_path / "c", 0, "x")
    assert not ck.due(5, 100) and ck.restore() is None
    on = Checkpointer(tmp_path / "c", 5, "x")
    assert [s for s in range(1, 21) if on.due(s, 20)] == [5, 10, 15]  # never at the end: the outputs are written then


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def test_a_pickle_named_like_a_checkpoint_is_refused_unexecuted(tmp_path: Path, monkeypatch):
    global MARKER
    MARKER = tmp_path / "pwned"
    directory = tmp_path / "ck"
    directory.mkdir()
    (directory / LAST).write_bytes(pickle.dumps({"step": 5, "x": _Payload()}))
    torch.save({"step": 5, "x": _Payload()}, directory / PREV)
    ck = Checkpointer(directory, 5, "run")
    assert ck.restore() is None
    assert all("unreadable" in n for n in ck.notes) and len(ck.notes) == 2
    assert not MARKER.exists()  # the payload never ran


# --------------------------------------------------------------------------------------------------------------
# What a checkpoint must match to be resumed: the code, the torch version, the structure of the state.


def test_the_fingerprint_holds_the_code_and_the_torch_version(tmp_path, monkeypatch):
    from helpers import section
    from study import checkpoint

    base, params = section("base"), section("teacher")
    latents = tmp_path / "latents.safetensors"
    latents.write_bytes(b"latents")
    key = lambda: checkpoint.run_checkpointer(tmp_path, "teacher-x", 5, stage="teacher", params=params, base=base,
                                              inputs=[latents]).run_fingerprint
    original = key()
    assert key() == original
    monkeypatch.setattr(checkpoint, "code_hash", lambda module: "other code")
    assert key() != original
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint.torch, "__version__", "0.0.0")
    assert key() != original


def test_the_code_hash_changes_with_any_file_the_stage_imports(tmp_path):
    import shutil

    from study import imports

    for name in imports.PACKAGES:
        shutil.copytree(imports.ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = imports.code_hash("stages.distill", tmp_path)
    unrelated = tmp_path / "study" / "fidelity.py"  # not imported by distill
    unrelated.write_text(unrelated.read_text() + "\n# edit\n")
    assert imports.code_hash("stages.distill", tmp_path) == before
    used = tmp_path / "scm" / "losses.py"
    used.write_text(used.read_text() + "\n# edit\n")
    assert imports.code_hash("stages.distill", tmp_path) != before


@pytest.mark.parametrize("damage", ["shape", "fp16", "missing key", "extra key", "no optimizer"])
def test_a_checkpoint_that_does_not_fit_the_run_is_ignored_not_a_crash(tmp_path, damage):
    from study.checkpoint import state_mismatch

    net, opt = _net_and_adam(2)
    expected = {"step": 0, "net": net.state_dict(), "optimizer": {"state": {}, "param_groups": opt.state_dict()["param_groups"]},
                "history": None}
    state = {"step": 4, "net": {k: v.clone() for k, v in net.state_dict().items()}, "optimizer": opt.state_dict(),
             "history": [{"step": 0}]}
    assert state_mismatch(state, expected) is None
    if damage == "shape":
        state["net"]["0.weight"] = torch.zeros(5, 3)
    elif damage == "fp16":
        state["net"]["0.weight"] = state["net"]["0.weight"].half()
    elif damage == "missing key":
        del state["net"]["2.bias"]
    elif damage == "extra key":
        state["net"]["3.weight"] = torch.zeros(1)
    else:
        del state["optimizer"]
    why = state_mismatch(state, expected)
    assert why is not None and "\n" not in why
    ck = Checkpointer(tmp_path / "run", every=1, run_fingerprint="fp")
    write_checkpoint(ck.directory, state, "fp")
    assert ck.restore(expected) is None
    assert ck.notes[-1].startswith(f"ignoring {ck.directory / LAST}: does not fit this run (") and "starting afresh" in ck.notes[-1]
