"""Kill a real training process (SIGKILL) at several points, re-run it until it finishes, and check that the result is
bit-identical to an uninterrupted run, that every kill resumed from the last checkpoint, and that no corrupt or
temporary file is left anywhere.

Kill points: before a training step (work since the last checkpoint is lost), with a new checkpoint written but not
yet renamed, between moving ``last`` to ``prev`` and renaming the new one in, and at a random moment from outside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from study.checkpoint import LAST, PREV
from helpers import params_text

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 6, 6)
EVERY, STEPS = 5, 40


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    from helpers import write_latents

    return write_latents(tmp_path_factory.mktemp("data") / "latents", SHAPE, n_train=40)


PARAMS = f"""
base: {{device: cpu, threads: 1, scales: [cpu-xs]}}
teacher: {{steps: {STEPS}, batch_size: 8, lr_warmup_steps: 3, log_every: 1, checkpoint_every: {EVERY}, ema_half_life_kimg: 0.05}}
distill: {{method: scd, steps: {STEPS}, batch_size: 8, tangent_warmup_steps: 6, log_every: 1, checkpoint_every: {EVERY}, ema_half_life_kimg: 0.05}}
encode: {{codec: train, channels: [8, 16], latent_channels: 2, steps: {STEPS}, batch_size: 8, encode_batch_size: 16,
         checkpoint_every: {EVERY}}}
"""


def _stage_argv(stage: str, project: Path, latents: Path, teacher: Path | None) -> list[str]:
    argv = [sys.executable, "-m", f"stages.{stage}", "--params", str(project / "params.yaml"), "--scale", "cpu-xs",
            "--latents", str(latents), "--out", str(project / "out"), "--metrics", str(project / "metrics.json"),
            "--history", str(project / "history.csv")]
    return argv + (["--teacher", str(teacher)] if teacher is not None else [])


def _run(argv: list[str], project: Path, failpoint: str = "", kill_when: Path | None = None) -> tuple[int, str]:
    """Run a stage; with ``failpoint`` it kills itself there; with ``kill_when``, SIGKILL it from outside a random
    0-30 ms after that file appears. Its exit code (negative: the signal) and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "SCM_FAILPOINT")}
    env["PYTHONPATH"] = str(ROOT)
    if failpoint:
        env["SCM_FAILPOINT"] = failpoint
    proc = subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_when is not None:
        deadline = time.monotonic() + 120
        while not kill_when.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(random.Random(0).uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, -signal.SIGKILL), f"{argv}: exit {proc.returncode}\n{err[-3000:]}"
    return proc.returncode, err


def _files(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*")}


def _checkpoint_steps(ckdir: Path) -> dict[str, int]:
    from safetensors import safe_open

    from study.checkpoint import read_checkpoint

    steps = {}
    for name in (LAST, PREV):
        if (ckdir / name).exists():
            with safe_open(str(ckdir / name), framework="pt") as f:
                fp = f.metadata()["fingerprint"]
            steps[name] = read_checkpoint(ckdir / name, fp)[0]["step"]
    return steps


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_killed_training_resumes_to_identical_weights(stage: str, latents: Path, tmp_path: Path, teacher_dir: Path):
    teacher = teacher_dir if stage == "distill" else None
    ref, work = tmp_path / "reference", tmp_path / "killed"
    for project in (ref, work):
        project.mkdir()
        (project / "params.yaml").write_text(params_text(PARAMS))

    # The uninterrupted run.
    assert _run(_stage_argv(stage, ref, latents, teacher), ref)[0] == 0
    ckdir = work / "checkpoints" / f"{stage}-cpu-xs"
    argv = _stage_argv(stage, work, latents, teacher)

    # 1. Killed before its 8th step: checkpoint 5 is on disk, steps 5-6 are lost.
    assert _run(argv, work, "step:8")[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir) == {LAST: 5} and not (work / "out").exists()
    # 2. Resumes at 5; killed with checkpoint 15 written to a temporary file, not yet renamed.
    assert _run(argv, work, "checkpoint-tmp:2")[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir) == {LAST: 10, PREV: 5}
    assert len(list(ckdir.glob(".ckpt-*.tmp"))) == 1  # the torn write, never read
    # 3. Resumes at 10; killed between "last -> prev" and "new -> last": only prev (10) is complete.
    assert _run(argv, work, "checkpoint-swap:1")[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir) == {PREV: 10}
    # 4. Resumes at 10 (from prev); killed from outside just after it writes checkpoint 15.
    assert _run(argv, work, kill_when=ckdir / LAST)[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir)[LAST] >= 15
    # 5. Runs to the end, and says where it resumed.
    code, err = _run(argv, work)
    assert code == 0 and f"{stage}-cpu-xs: resuming from {ckdir / LAST} at step" in err

    # Same weights, bit for bit; the same loss at every step; the resume is recorded; nothing left behind.
    a, b = load_file(str(ref / "out" / "model.safetensors")), load_file(str(work / "out" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda p: [line.split(",")[2] for line in (p / "history.csv").read_text().splitlines()[1:]]
    assert losses(ref) == losses(work) and len(losses(ref)) == STEPS
    assert json.loads((work / "metrics.json").read_text())["resumed_from_step"] >= 15
    assert json.loads((ref / "metrics.json").read_text())["resumed_from_step"] == 0
    assert _files(work) == _files(ref) == {"params.yaml", "out", "out/model.safetensors", "out/resolved_params.json",
                                           "out/provenance.json", "metrics.json", "history.csv"}


@pytest.fixture(scope="module")
def teacher_dir(latents: Path, tmp_path_factory) -> Path:
    """A teacher for the distill runs (a short uninterrupted teacher run)."""
    project = tmp_path_factory.mktemp("teacher")
    (project / "params.yaml").write_text(params_text(PARAMS.replace(f"steps: {STEPS}", "steps: 4", 1)))
    assert _run(_stage_argv("teacher", project, latents, None), project)[0] == 0
    return project / "out"


def test_autoencoder_training_resumes_to_identical_weights(tmp_path: Path):
    """The encode stage's AutoencoderKL: killed before a step and in the middle of a checkpoint write, it ends
    with bit-identical latents and codec weights."""
    from helpers import synthetic_images, write_prepared

    prepared = write_prepared(tmp_path / "prepared", synthetic_images(40, 1, 8), n_eval=8)
    ref, work = tmp_path / "reference", tmp_path / "killed"
    for project in (ref, work):
        project.mkdir()
        (project / "params.yaml").write_text(params_text(PARAMS))
    argv = lambda project: [sys.executable, "-m", "stages.encode", "--params", str(project / "params.yaml"),
                            "--data", str(prepared), "--out", str(project / "out")]
    assert _run(argv(ref), ref)[0] == 0
    ckdir = work / "checkpoints" / "encode"
    assert _run(argv(work), work, "step:13")[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir) == {LAST: 10, PREV: 5}
    assert _run(argv(work), work, "checkpoint-tmp:3")[0] == -signal.SIGKILL
    assert _checkpoint_steps(ckdir) == {LAST: 20, PREV: 15}
    assert _run(argv(work), work)[0] == 0
    for name in ("latents.safetensors", "codec/diffusion_pytorch_model.safetensors"):
        a, b = load_file(str(ref / "out" / name)), load_file(str(work / "out" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not (work / "checkpoints").exists()
    assert _files(work) == _files(ref)
