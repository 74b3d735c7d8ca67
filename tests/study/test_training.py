"""study/training.py, study/models.py, study/latents.py: model files round-trip and refuse anything else (another scale or shape, a damaged or foreign
file, a pickle whose payload must never run); minibatches are seeded epochs; the loop skips non-finite steps and
gives up, naming the step, after too many in a row."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scm.losses import LossOutput
from study.errors import StageError
from study.latents import load_latents
from study.models import build_net, load_model, read_model_meta, save_model
from study.training import Minibatches, TrainSpec, train
from helpers import section, write_latents

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 8, 8)
META = {"role": "teacher", "scale": "cpu-xs", "latent_shape": list(SHAPE), "sigma_data": 0.5}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A cpu-xs U-Net on 2×8×8 latents, saved by save_model."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, build_net("cpu-xs", SHAPE), META)
    return path


def refused(path: Path, **kw) -> str:
    """load_model's one-line StageError for ``path``, which must name the path."""
    with pytest.raises(StageError) as e:
        load_model(path, **kw)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------------------------------------
# Model files.


def test_save_load_round_trip_gives_the_same_outputs(model_file):
    torch.manual_seed(0)
    net = build_net("cpu-xs", SHAPE).eval()
    with torch.no_grad():  # perturb every weight, so zero-initialised layers matter too
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = model_file.parent / "perturbed.safetensors"
    save_model(path, net, META)
    x, t = torch.randn(3, *SHAPE), torch.tensor([0.1, 0.7, 1.5])
    loaded, meta = load_model(path, expect_shape=SHAPE, expect_scale="cpu-xs")
    with torch.no_grad():
        assert torch.equal(net(x, t), loaded(x, t))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert meta["scale"] == "cpu-xs" and meta["latent_shape"] == list(SHAPE) and meta["role"] == "teacher"
    assert meta["n_params"] == sum(p.numel() for p in net.parameters()) and isinstance(meta["unet"], dict)
    assert read_model_meta(path) == meta
    # A directory holding model.safetensors loads the same.
    loaded_dir, _ = load_model(model_file.parent)
    assert loaded_dir.cfg == loaded.cfg
    assert sorted(os.listdir(model_file.parent)) == ["model.safetensors", "perturbed.safetensors"]  # atomic: no temp files


def test_refuses_a_model_of_another_scale(model_file):
    msg = refused(model_file, expect_scale="cpu-s")
    assert "'cpu-xs'" in msg and "'cpu-s'" in msg


def test_errors_can_name_what_the_user_gave_instead_of_a_copy(model_file, tmp_path):
    """A stage that validates a fetched copy passes ``name`` (e.g. its teacher.source) to be named in the error."""
    junk = tmp_path / "model.safetensors"
    junk.write_bytes(b"\x80\x02junk")
    for path, kw, expected in [(model_file, {"expect_scale": "cpu-s"}, "scale 'cpu-s'"), (junk, {}, "pickle"),
                               (tmp_path / "none", {}, "not found")]:
        with pytest.raises(StageError) as e:
            load_model(path, name="teacher.source='https://example.org/t.safetensors'", **kw)
        msg = str(e.value)
        assert msg.startswith("teacher.source='https://example.org/t.safetensors': ") and expected in msg
        assert str(path) not in msg


def test_refuses_a_model_of_another_latent_shape(model_file):
    msg = refused(model_file, expect_shape=(4, 7, 7))
    assert "(2, 8, 8)" in msg and "(4, 7, 7)" in msg


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_refuses_a_truncated_model_file(model_file, tmp_path, keep):
    data = model_file.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data[:n])
    assert "not a readable safetensors model file" in refused(path)


def test_refuses_random_bytes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(10_000))
    assert "not a readable safetensors model file" in refused(path)


def test_refuses_a_missing_file(tmp_path):
    assert "model file not found" in refused(tmp_path / "nope.safetensors")
    assert "model file not found" in refused(tmp_path)  # a directory without model.safetensors


def test_refuses_safetensors_without_scm_metadata(model_file, tmp_path):
    state = load_file(str(model_file))
    for i, metadata in enumerate([None, {"format": "pt"}]):
        path = tmp_path / f"{i}.safetensors"
        save_file(state, str(path), metadata=metadata)
        assert "no 'scm' metadata" in refused(path)


@pytest.mark.parametrize("case", ["not json", "a list", "no unet", "unet: unknown key", "unet: bad value",
                                  "unet: another width", "an extra tensor"])
def test_refuses_a_damaged_scm_description(model_file, tmp_path, case):
    state = load_file(str(model_file))
    meta = read_model_meta(model_file)
    unet = meta["unet"]
    scm = {
        "not json": "{not json",
        "a list": "[1, 2]",
        "no unet": json.dumps({k: v for k, v in meta.items() if k != "unet"}),
        "unet: unknown key": json.dumps({**meta, "unet": {**unet, "bogus": 1}}),
        "unet: bad value": json.dumps({**meta, "unet": {**unet, "model_channels": "wide"}}),
        "unet: another width": json.dumps({**meta, "unet": {**unet, "model_channels": 32}}),  # weights do not fit
        "an extra tensor": json.dumps(meta),
    }[case]
    if case == "an extra tensor":
        state = {**state, "extra": torch.zeros(1)}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path), metadata={"scm": scm})
    refused(path)


# --------------------------------------------------------------------------------------------------------------
# Pickles are refused and never run.


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(params=["zip", "legacy", "raw-pickle"])
def evil(request, tmp_path) -> tuple[Path, Path]:
    """``(checkpoint, marker)``: a pickle checkpoint whose unpickling would create ``marker``."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    obj = {"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}
    if request.param == "raw-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=request.param == "zip")
    assert not marker.exists()
    return path, marker


def test_the_payload_is_live(evil):
    """Sanity check of the fixture: a full unpickle does run it (so the refusals below mean something)."""
    path, marker = evil
    try:
        torch.load(path, weights_only=False)
    except Exception:  # noqa: BLE001 (open() returns a file, the load may then fail; the marker is what counts)
        pass
    assert marker.exists()


def test_load_model_refuses_a_pickle_without_running_it(evil):
    path, marker = evil
    msg = refused(path)
    assert "safetensors" in msg and "pickle" in msg
    for name in ("model.safetensors",):  # also under the name a teacher file has
        renamed = path.with_name(name)
        renamed.write_bytes(path.read_bytes())
        assert "pickle" in refused(renamed)
    assert not marker.exists()


def test_torch_load_weights_only_refuses_a_pickle(evil):
    path, marker = evil
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_teacher_stage_refuses_a_pickle_source(tmp_path):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"payload": _Payload(marker)}, evil)
    latents = write_latents(tmp_path / "latents")
    out = tmp_path / "artifacts" / "teacher"
    res = subprocess.run(
        [sys.executable, "-m", "stages.teacher", "--params", str(ROOT / "params.yaml"), "--scale", "cpu-xs",
         "--latents", str(latents), "--out", str(out), "--metrics", str(tmp_path / "m.json"),
         "--history", str(tmp_path / "h.csv"), "-S", f"teacher.source={evil}", "-S", "base.device=cpu"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "pickle" in last and "Traceback" not in res.stderr
    assert not marker.exists()
    assert not out.exists() and os.listdir(out.parent) == []  # no output, no temporary directory
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "h.csv").exists()


_TORCH_LOAD = re.compile(r"\btorch\.load\s*\(")


def _torch_load_calls(source: str) -> list[str]:
    """The full text of every ``torch.load(...)`` call in ``source`` (parentheses balanced)."""
    calls = []
    for m in _TORCH_LOAD.finditer(source):
        depth, i = 0, m.end() - 1
        for i in range(m.end() - 1, len(source)):
            depth += {"(": 1, ")": -1}.get(source[i], 0)
            if depth == 0:
                break
        calls.append(source[m.start() : i + 1])
    return calls


def _passes_weights_only(call: str) -> bool:
    return re.search(r"\bweights_only\s*=\s*True\b", call) is not None


def test_every_torch_load_in_our_code_passes_weights_only_true():
    # The scanner itself: it finds calls, across lines, and tells the two kinds apart.
    probe = "a = torch.load(f)\nb = torch.load(\n    g(x), map_location='cpu',\n    weights_only=True,\n)\n"
    assert [_passes_weights_only(c) for c in _torch_load_calls(probe)] == [False, True]

    files = sorted(p for d in ("scm", "study", "stages", "pipeline") for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for path in files:
        source = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {c!r}" for c in _torch_load_calls(source) if not _passes_weights_only(c)]
        # The same through the AST: any `<torch>.load(...)` or a bare `load` imported from torch, and no pickle loads.
        tree = ast.parse(source)
        from_torch = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "torch"
                      for a in n.names if a.name == "load"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            is_torch_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                             and f.value.id == "torch") or (isinstance(f, ast.Name) and f.id in from_torch)
            weights_only = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                               for k in node.keywords)
            if is_torch_load and not weights_only:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: torch.load without weights_only=True")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in ("pickle", "cPickle", "dill") \
                    and f.attr in ("load", "loads", "Unpickler"):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {f.value.id}.{f.attr}")
    assert not offenders, offenders


# --------------------------------------------------------------------------------------------------------------
# Latents.


def test_load_latents_refuses_bad_files(tmp_path):
    good = write_latents(tmp_path / "good")
    assert load_latents(good).shape == SHAPE
    bad_json = write_latents(tmp_path / "bad_json")
    (bad_json / "codec.json").write_text("{kind: ")
    flat = tmp_path / "flat"
    flat.mkdir()
    labels = torch.zeros(4, dtype=torch.long)
    save_file({"train": torch.zeros(4, 3), "eval": torch.zeros(4, 3), "train_labels": labels, "eval_labels": labels.clone()},
              str(flat / "latents.safetensors"))
    (flat / "codec.json").write_text("{}")
    nan = write_latents(tmp_path / "nan")
    t = load_file(str(nan / "latents.safetensors"))
    t["train"][3, 1, 2, 2] = float("nan")
    save_file(t, str(nan / "latents.safetensors"))
    for folder, expected in [(bad_json, "codec.json: not valid JSON"), (flat, "(N, C, H, W)"), (nan, "NaN"),
                             (tmp_path / "missing", "not found")]:
        with pytest.raises(StageError, match=re.escape(expected)) as e:
            load_latents(folder)
        assert str(folder) in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------------------
# Minibatches.


@pytest.mark.parametrize("n, batch_size", [(12, 4), (10, 4), (7, 7), (5, 8)])
def test_minibatches_are_seeded_epochs(n, batch_size):
    take = lambda seed, k: [next(it) for it in [Minibatches(n, batch_size, seed)] for _ in range(k)]
    k = 3 * n  # several epochs whatever the sizes
    a, b, c = take(0, k), take(0, k), take(1, k)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic for a seed
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # another seed, another order
    assert all(len(x) == batch_size and x.dtype == torch.long for x in a)
    flat = torch.cat(a)  # epochs are consecutive runs of n indices, wrapping across batches
    epochs = flat[: len(flat) // n * n].view(-1, n)
    assert len(epochs) >= 3
    for epoch in epochs:
        assert torch.equal(epoch.sort().values, torch.arange(n))  # every index exactly once per epoch
    assert not all(torch.equal(e, epochs[0]) for e in epochs)  # a fresh permutation every epoch


# --------------------------------------------------------------------------------------------------------------
# The loop.


def _linear_problem(bad_steps):
    """A tiny nn.Linear regression whose loss is +inf at ``bad_steps`` (a set, or a predicate on the step)."""
    torch.manual_seed(0)
    net = nn.Linear(3, 1)
    data = torch.randn(32, 3)
    is_bad = bad_steps if callable(bad_steps) else bad_steps.__contains__
    seen = []

    def loss_fn(step, x0, gen):
        seen.append(step)
        per_sample = (net(x0).squeeze(1) - x0.sum(1)).square()
        loss = per_sample.mean()
        if is_bad(step):
            loss = loss * float("inf")
        return LossOutput(loss=loss, per_sample=per_sample.detach(), t=torch.zeros(len(x0)), stats={"mse": loss.item()})

    return net, data, loss_fn, seen


def _train(net, data, loss_fn, steps, max_nonfinite, checkpoint=None):
    settings = section("teacher", steps=steps, batch_size=8, lr=0.01, lr_warmup_steps=0, ema_half_life_kimg=0.01,
                       log_every=1, adaptive_weight=False, batch_per_device=0, max_nonfinite_steps=max_nonfinite)
    spec = TrainSpec(name="linear", section="teacher", settings=settings, seed=0,
                     objective=lambda net_dp, head_dp: loss_fn,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    return train(net, spec, data, checkpoint=checkpoint, progress=False)


def test_train_skips_non_finite_steps_and_counts_them():
    net, data, loss_fn, seen = _linear_problem({2, 5, 6})
    weights = []
    original = loss_fn

    def recording(step, x0, gen):  # the weights each step starts from
        weights.append(net.weight.detach().clone())
        return original(step, x0, gen)

    result = _train(net, data, recording, steps=10, max_nonfinite=3)
    assert seen == list(range(10))
    assert result.skipped_steps == 3
    assert [row["skipped"] for row in result.history] == [0, 0, 1, 1, 1, 2, 3, 3, 3, 3]
    for step in (2, 5, 6):  # a skipped step leaves the weights as they were
        assert torch.equal(weights[step], weights[step + 1])
    assert not torch.equal(weights[0], weights[1])  # a finite step moves them
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert all(torch.isfinite(p).all() for p in result.ema.net.parameters())
    assert result.history[-1]["step"] == 9 and torch.isfinite(torch.tensor(result.history[-1]["loss"]))


def test_train_stops_after_max_nonfinite_in_a_row_naming_the_step():
    net, data, loss_fn, seen = _linear_problem(lambda step: step >= 3)
    with pytest.raises(StageError) as e:
        _train(net, data, loss_fn, steps=50, max_nonfinite=4)
    msg = str(e.value)
    assert msg.startswith("linear:") and "4 steps in a row" in msg and "step 6" in msg and "\n" not in msg
    assert seen == list(range(7))  # stopped right there
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_a_non_finite_stop_keeps_the_last_good_checkpoint(tmp_path):
    from study.checkpoint import LAST, PREV, Checkpointer

    net, data, loss_fn, seen = _linear_problem(lambda step: step >= 5)
    ck = Checkpointer(tmp_path / "teacher-x", every=2, run_fingerprint="run")
    with pytest.raises(StageError) as e:
        _train(net, data, loss_fn, steps=50, max_nonfinite=3, checkpoint=ck)
    assert "step 7" in str(e.value) and f"it resumes from {ck.directory / LAST}, taken before the streak" in str(e.value)
    # The streak began at step 5, so the update of step 4 led into it: the checkpoint of step 6 (weights after
    # step 4) is deleted, and the one of step 4 (weights after step 3) is the newest kept.
    state = ck.restore()
    assert state["step"] == 4 and state["skipped"] == 0
    assert not (ck.directory / PREV).is_file()


def test_after_a_non_finite_stop_a_lower_lr_resumes_from_before_the_streak(tmp_path):
    """The advice is true: lower the learning rate and re-run, and the run resumes (the lr may change on resume)."""
    from helpers import section
    from study import checkpoint as ckpt

    params = section("teacher")
    lower = section("teacher", lr=params.lr / 10)
    base, inputs = section("base"), [tmp_path / "data"]
    inputs[0].write_bytes(b"data")
    make = lambda p: ckpt.run_checkpointer(tmp_path, "teacher-x", 2, stage="teacher", params=p, base=base, inputs=inputs)
    assert make(params).run_fingerprint == make(lower).run_fingerprint
    assert make(params).run_fingerprint != make(section("teacher", P_mean=0.0)).run_fingerprint


def test_train_starts_afresh_from_a_checkpoint_of_the_right_run_that_does_not_fit(tmp_path):
    """Same fingerprint, other shapes (a network edited in place): ignored with a note, never a traceback."""
    from study.checkpoint import Checkpointer, write_checkpoint

    net, data, loss_fn, seen = _linear_problem(set())
    ck = Checkpointer(tmp_path / "teacher-x", every=100, run_fingerprint="run")
    write_checkpoint(ck.directory, {"step": 3, "net": {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}}, "run")
    result = _train(net, data, loss_fn, steps=4, max_nonfinite=3, checkpoint=ck)
    assert seen == [0, 1, 2, 3] and result.resumed_from == 0
    assert "does not fit this run" in ck.notes[0] and "starting afresh" in ck.notes[0]


def test_a_run_whose_every_sample_was_masked_fails(tmp_path):
    """sCM masks samples with a non-finite tangent; a run where every sample was masked trained on nothing."""
    net, data, _, _ = _linear_problem(set())

    def all_masked(step, x0, noise):
        loss = (net(x0) * 0).sum()
        return LossOutput(loss=loss, per_sample=torch.zeros(len(x0)), t=torch.zeros(len(x0)),
                          stats={"mse": float("nan"), "nonfinite": len(x0)})

    with pytest.raises(StageError, match=r"^linear: no step trained on a finite sample \(0 of 3 steps skipped"):
        _train(net, data, all_masked, steps=3, max_nonfinite=5)


def test_a_model_with_non_finite_weights_is_refused(tmp_path):
    net = build_net("cpu-xs", SHAPE)
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    save_model(tmp_path / "nan.safetensors", net, META)
    msg = refused(tmp_path / "nan.safetensors")
    assert "holds NaN or inf" in msg


def test_json_outputs_are_strict(tmp_path):
    import json

    from study.files import write_json

    write_json(tmp_path / "m.json", {"fid": float("nan"), "ok": 1.5, "nested": [float("inf"), {"x": float("-inf")}]})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"fid": None, "ok": 1.5, "nested": [None, {"x": None}]}


def _with_meta(model_file: Path, dest: Path, **changes) -> Path:
    """A copy of ``model_file`` whose 'scm' metadata has ``changes`` ('unet.<key>' edits the network description)."""
    from safetensors import safe_open

    with safe_open(str(model_file), framework="pt") as f:
        info = json.loads(f.metadata()["scm"])
    for key, value in changes.items():
        section, _, field = key.rpartition("__")
        (info[section] if section else info)[field] = value
    save_file(load_file(str(model_file)), str(dest), metadata={"scm": json.dumps(info)})
    return dest


def test_a_forged_width_is_refused_before_anything_is_allocated(model_file, tmp_path):
    """model_channels = 10⁶ would be ~10¹³ parameters: the file's header alone refutes it, on the meta device."""
    import resource

    forged = _with_meta(model_file, tmp_path / "wide.safetensors", unet__model_channels=1_000_000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    msg = refused(forged)
    assert "weights do not match the network they describe (tensor" in msg
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: no real allocation


def test_huge_metadata_values_are_not_echoed_whole(model_file, tmp_path):
    forged = _with_meta(model_file, tmp_path / "long.safetensors", scale="x" * 2_000_000)
    msg = refused(forged, expect_scale="cpu-xs")
    assert len(msg) < 400 and "…" in msg


# --------------------------------------------------------------------------------------------------------------
# Optimiser, learning-rate schedule and EMA from params (the paper's per-experiment recipes).


def test_learning_rate_ramp_constant_and_edm2_inverse_square_root():
    from study.training import learning_rate

    const = section("teacher", lr=0.01, lr_warmup_steps=4, lr_schedule="constant", lr_ref_steps=100)
    assert [learning_rate(const, s) for s in (0, 1, 3, 500)] == [0.0025, 0.005, 0.01, 0.01]
    inv = section("teacher", lr=0.01, lr_warmup_steps=0, lr_schedule="inv_sqrt", lr_ref_steps=100)
    assert learning_rate(inv, 0) == learning_rate(inv, 100) == 0.01  # α_ref until t_ref
    assert learning_rate(inv, 400) == pytest.approx(0.005)  # α_ref/√(400/100)
    assert learning_rate(inv, 10_000) == pytest.approx(0.001)


def test_optimiser_and_ema_come_from_params():
    from scm.ema import EMA, PowerEMA
    from study.training import make_ema, make_optimizer

    net = nn.Linear(3, 1)
    opt = make_optimizer(section("distill", optimizer="radam", lr=1e-4, betas=(0.9, 0.99), eps=1e-11))(list(net.parameters()))
    assert isinstance(opt, torch.optim.RAdam)
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[0]["eps"] == 1e-11
    assert type(make_optimizer(section("teacher", optimizer="adam"))(list(net.parameters()))) is torch.optim.Adam
    power = make_ema(net, section("teacher", ema="power", ema_std=0.05))
    assert isinstance(power, PowerEMA) and power.std == 0.05
    assert isinstance(make_ema(net, section("teacher", ema="half_life", ema_half_life_kimg=1.0)), EMA)


def test_training_with_the_power_ema_and_inverse_square_root_schedule():
    net, data, loss_fn, _ = _linear_problem(set())
    settings = section("teacher", steps=6, batch_size=8, lr=0.01, lr_warmup_steps=2, lr_schedule="inv_sqrt",
                       lr_ref_steps=2, ema="power", ema_std=0.1, log_every=1, adaptive_weight=False,
                       batch_per_device=0, max_nonfinite_steps=3)
    spec = TrainSpec(name="linear", section="teacher", settings=settings, seed=0,
                     objective=lambda net_dp, head_dp: loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    result = train(net, spec, data, progress=False)
    assert [round(r["lr"], 6) for r in result.history] == [0.005, 0.01, 0.01, 0.008165, 0.007071, 0.006325]
    assert not torch.equal(result.ema.net.weight, net.weight)  # an average, not the last weights


def test_train_refuses_unresolved_per_scale_settings():
    net, data, loss_fn, _ = _linear_problem(set())
    settings = section("teacher", steps={"cpu-xs": 3, "cpu-s": 4}, batch_size=8, log_every=1, adaptive_weight=False)
    spec = TrainSpec(name="linear", section="teacher", settings=settings, seed=0,
                     objective=lambda net_dp, head_dp: loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    with pytest.raises(ValueError, match=r"per-scale values \(steps\): resolve them with .at\(scale\)"):
        train(net, spec, data, progress=False)


def test_labels_reach_the_objective_with_the_rows_of_their_micro_batch():
    """With labels, every micro-batch gets the labels of its own rows and noise with c (drawn after u and eps, so the
    first batch's u and eps are an unconditional run's); without, the objective is called as before."""
    torch.manual_seed(0)
    data = torch.randn(32, 3)
    labels = torch.arange(32) % 5

    def run(with_labels: bool) -> list[tuple[torch.Tensor, torch.Tensor | None, object]]:
        torch.manual_seed(0)
        net, seen = nn.Linear(3, 1), []

        def loss_fn(step, x0, noise, *batch_labels):
            seen.append((x0, batch_labels[0] if batch_labels else None, noise))
            per_sample = (net(x0).squeeze(1) - x0.sum(1) - noise.eps.sum(1)).square()
            return LossOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), t=torch.zeros(len(x0)))

        settings = section("teacher", steps=5, batch_size=8, lr=0.01, lr_warmup_steps=0, log_every=1,
                           adaptive_weight=False, batch_per_device=4, max_nonfinite_steps=3)
        spec = TrainSpec(name="linear", section="teacher", settings=settings, seed=0,
                         objective=lambda net_dp, head_dp: loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
        train(net, spec, data, labels=labels if with_labels else None, progress=False)
        return seen

    unconditional, conditional = run(False), run(True)
    assert all(y is None and noise.c is None for _, y, noise in unconditional)
    assert len(conditional) == 10  # 5 steps of 2 micro-batches
    for x0, y, noise in conditional:
        rows = [int((data == row).all(1).nonzero()) for row in x0]
        assert torch.equal(y, labels[rows]) and noise.c.shape == (4,)
    assert torch.equal(conditional[0][0], unconditional[0][0])  # the same rows, and the same u and eps
    assert torch.equal(conditional[0][2].u, unconditional[0][2].u) and torch.equal(conditional[0][2].eps, unconditional[0][2].eps)
    with pytest.raises(ValueError, match="3 labels for 32 training samples"):
        train(nn.Linear(3, 1), TrainSpec(name="linear", section="teacher", settings=section("teacher"), seed=0,
                                         objective=lambda a, b: None, optimizer=torch.optim.SGD), data,
              labels=labels[:3], progress=False)


def test_the_number_of_classes_comes_from_the_codec_description_or_the_labels(tmp_path):
    assert load_latents(write_latents(tmp_path / "a", n_train=8, n_eval=4)).num_classes == 10
    assert load_latents(write_latents(tmp_path / "b", n_train=8, n_eval=4, num_classes=None)).num_classes == 8


def test_the_training_set_is_the_train_split_or_every_image(tmp_path):
    data = load_latents(write_latents(tmp_path / "l", n_train=8, n_eval=4))
    x, y, std = data.training_set("train")
    assert x is data.train and y is data.train_labels and std is None
    x, y, std = data.training_set("all")
    assert torch.equal(x, torch.cat([data.train, data.eval])) and torch.equal(y, torch.cat([data.train_labels, data.eval_labels]))


def test_a_latent_is_drawn_from_its_posterior_at_every_use():
    """x0 = mean + std·ε with a fresh ε at each use of an image: an image seen twice gives two latents, spread with
    its std; a zero std gives the mean itself."""
    data = torch.zeros(8, 2)
    std = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).view(8, 1).expand(8, 2).contiguous()
    seen = []

    def loss_fn(step, x0, noise):
        seen.append(x0.clone())
        per_sample = (net(x0).squeeze(1) - 1).square()
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), t=torch.zeros(len(x0)))

    net = nn.Linear(2, 1)
    settings = section("teacher", steps=200, batch_size=8, lr=0.01, lr_warmup_steps=0, log_every=50,
                       adaptive_weight=False, batch_per_device=0, max_nonfinite_steps=3)
    spec = TrainSpec(name="linear", section="teacher", settings=settings, seed=0,
                     objective=lambda net_dp, head_dp: loss_fn, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    train(net, spec, data, posterior_std=std, progress=False)
    x0 = torch.cat(seen)  # every row of data, 200 times, in each batch's order
    zero = x0.abs().sum(1) == 0
    assert zero.sum() == 4 * 200  # the rows with std 0 are their mean, every time
    drawn = x0[~zero]
    assert len(drawn.unique()) == drawn.numel()  # a new draw at each use
    assert abs(drawn.std().item() - 1.0) < 0.05 and abs(drawn.mean().item()) < 0.05
    with pytest.raises(ValueError, match="posterior std of shape"):
        train(net, spec, data, posterior_std=std[:4], progress=False)
