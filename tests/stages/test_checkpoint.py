"""stages/checkpoint.py: the training state round-trips through safetensors + JSON exactly; writes are atomic and keep
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
