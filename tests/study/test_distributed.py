"""study/distributed.py: shards cover the global batch exactly once; batch splits are checked; and a real 2-process
torchrun (gloo, CPU) of the teacher and distill stages gives the loss and weights of one process on the same global
batch, as does gradient accumulation. Only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from study import distributed
from study.errors import StageError
from helpers import params_text

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (2, 6, 6)
# Float tolerance: N ranks sum their gradients in another order than one process does (all-reduce vs one batch).
ATOL, RTOL = 1e-5, 1e-4  # losses
REL = 1e-3  # weight updates, relative (see _assert_match)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_partition_the_global_batch(world: int):
    n = 12
    parts = [torch.arange(n)[distributed.shard(n, distributed.Dist(r, world, r, True))] for r in range(world)]
    assert torch.equal(torch.cat(parts), torch.arange(n))  # disjoint, in order, all of it


def test_micro_batches_and_bad_splits():
    two = distributed.Dist(0, 2, 0, True)
    assert distributed.micro_batches(128, 0, distributed.SINGLE, name="teacher") == (128, 1)
    assert distributed.micro_batches(128, 32, two, name="teacher") == (32, 2)
    with pytest.raises(StageError, match=r"^teacher.batch_size=127 does not split over 2 processes$"):
        distributed.micro_batches(127, 0, two, name="teacher")
    with pytest.raises(StageError, match=r"^distill.batch_per_device=24 does not divide the per-process batch 64"):
        distributed.micro_batches(128, 24, two, name="distill")


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    from helpers import write_latents

    return write_latents(tmp_path_factory.mktemp("data") / "latents", SHAPE, n_train=32)


PARAMS = """
base: {device: cpu, threads: 1, scales: [cpu-xs]}
teacher: {steps: 4, batch_size: 8, lr: 0.002, lr_warmup_steps: 0, log_every: 1, ema_half_life_kimg: 0.001}
distill: {method: scd, steps: 4, batch_size: 8, lr: 0.001, tangent_warmup_steps: 2, log_every: 1, ema_half_life_kimg: 0.001}
"""


def _stage(stage: str, workdir: Path, latents: Path, *, nproc: int = 0, batch_per_device: int = 0,
           teacher: Path | None = None, params: str = PARAMS) -> dict:
    """Run a stage (under torchrun with ``nproc`` processes, else plain); its metrics, losses per step and weights."""
    workdir.mkdir(parents=True)
    (workdir / "params.yaml").write_text(params_text(params))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc \
        else [sys.executable]
    argv = launcher + ["-m", f"stages.{stage}", "--params", "params.yaml", "--scale", "cpu-xs", "--latents", str(latents),
                       "--out", "out", "--metrics", "metrics.json", "--history", "history.csv",
                       "-S", f"{stage}.batch_per_device={batch_per_device}"]
    argv += ["--teacher", str(teacher)] if teacher is not None else []
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_ROOT", "SCM_FAILPOINT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{argv}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    rows = (workdir / "history.csv").read_text().splitlines()
    loss_col = rows[0].split(",").index("loss")
    return {"dir": workdir / "out", "metrics": json.loads((workdir / "metrics.json").read_text()), "stdout": res.stdout,
            "losses": [float(r.split(",")[loss_col]) for r in rows[1:]],
            "weights": load_file(str(workdir / "out" / "model.safetensors")),
            "files": sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))}


def _assert_match(a: dict, b: dict, start: dict[str, torch.Tensor], rel: float = REL) -> None:
    """Same loss at every step (to ATOL/RTOL); same weight update ‖w_b − w_a‖ ≤ rel·‖w_a − w_start‖.

    The update is compared as a whole because Adam divides by √v: for the rare weight whose gradient is ~0 (1e-9, a
    sum that cancels), the order of the sums changes its step by up to lr. One run showed 14 of 165,810 weights
    differing by more than 1e-5 and a relative update difference of 1.4e-4.
    """
    assert len(a["losses"]) == len(b["losses"]) == 4
    assert torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=RTOL, atol=ATOL), (a["losses"], b["losses"])
    norm = lambda d: sum(float((v.double() ** 2).sum()) for v in d.values()) ** 0.5
    moved = norm({k: a["weights"][k] - start[k] for k in start})
    differ = norm({k: b["weights"][k] - a["weights"][k] for k in start})
    assert moved > 1e-5, f"training did not move the weights ({moved})"
    assert differ <= rel * moved, f"weight updates differ by {differ / moved:.2e} of their size (tolerance {rel})"


def _initial_teacher() -> dict[str, torch.Tensor]:
    """The teacher's initial weights: the stage seeds with base.seed = 0, then builds the net."""
    from study.models import build_net

    torch.manual_seed(0)
    return build_net("cpu-xs", SHAPE).state_dict()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(latents: Path, tmp_path: Path):
    # Teacher: one process, one process with 2 accumulated micro-batches, 2 ranks × 2 micro-batches each.
    single = _stage("teacher", tmp_path / "t1", latents)
    accumulated = _stage("teacher", tmp_path / "t1acc", latents, batch_per_device=4)
    ddp = _stage("teacher", tmp_path / "t2", latents, nproc=2, batch_per_device=2)
    start = _initial_teacher()
    _assert_match(single, accumulated, start)
    _assert_match(single, ddp, start)
    assert single["losses"] != [single["losses"][0]] * 4  # training moved
    # Only rank 0 wrote: the same files as one process, one summary line.
    assert ddp["files"] == single["files"]
    assert ddp["stdout"].count("teacher-cpu-xs:") == 1
    assert json.loads((tmp_path / "t2" / "out" / "resolved_params.json").read_text())["params"]["world_size"] == 2

    # Distill (the JVP on the plain module, the grad forward through DDP), from the single-process teacher.
    teacher = tmp_path / "t1" / "out"
    _assert_match(_stage("distill", tmp_path / "d1", latents, teacher=teacher),
                  _stage("distill", tmp_path / "d2", latents, nproc=2, teacher=teacher), single["weights"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torchrun_nccl_on_cuda_matches_one_process_and_bf16_trains(latents: Path, tmp_path: Path):
    """On one GPU: torchrun (NCCL, DDP with one rank, 2 micro-batches) = a plain process; bf16 autocast trains."""
    cuda = PARAMS.replace("device: cpu", "device: cuda")
    teacher = _stage("teacher", tmp_path / "ct", latents, params=cuda)["dir"]
    single = _stage("distill", tmp_path / "c1", latents, teacher=teacher, params=cuda)
    ddp = _stage("distill", tmp_path / "c2", latents, nproc=1, batch_per_device=4, teacher=teacher, params=cuda)
    _assert_match(single, ddp, _stage_weights(teacher), rel=1e-2)  # TF32 convolutions on CUDA
    bf16 = _stage("distill", tmp_path / "c3", latents, teacher=teacher,
                  params=cuda.replace("scales: [cpu-xs]}", "scales: [cpu-xs], precision: bf16}"))
    assert all(torch.isfinite(torch.tensor(bf16["losses"])))
    assert all(torch.isfinite(w).all() for w in bf16["weights"].values())
    assert bf16["losses"][0] == pytest.approx(single["losses"][0], rel=1e-5)  # step 0: same g, so the same loss value
    assert bf16["weights"].keys() == single["weights"].keys()


def _stage_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model.safetensors"))
