"""Data parallelism for the training stages: torchrun + DistributedDataParallel, or one plain process.

Launch a training stage with ``torchrun --nproc_per_node N -m stages.teacher ...`` (see the README for multi-node).
The process group uses NCCL on GPUs and gloo on CPU. The parameters keep their single-process meaning:

- ``batch_size`` is the *global* batch of one optimiser step, split evenly over the ranks; each rank runs it in
  micro-batches of ``batch_per_device`` (0 = all of its share at once), accumulating gradients;
- every rank draws the same global batch indices and the same noise for the global batch and keeps its own slice,
  so N ranks compute the same gradient as one process (up to the order of floating-point sums);
- the EMA, the learning rate and the checkpoints count optimiser steps and global images, whatever the world size;
- only rank 0 shows progress, writes checkpoints and writes the stage's outputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn

from study.errors import StageError
from study.runtime import pick_device, setup_torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # launched by torchrun: a process group and DDP, even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """The rank and world size torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK); one plain process without them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return SINGLE
    return Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")), True)


def setup(requested_device: str) -> tuple[Dist, str]:
    """Join the process group when launched by torchrun; the device of this rank (cuda:LOCAL_RANK on GPUs)."""
    dist = from_env()
    device = pick_device(requested_device)
    if not dist.enabled:
        return dist, device
    if device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return dist, device


def teardown(dist: Dist) -> None:
    """Leave the process group (no barrier: rank 0 may still be writing outputs, or a rank may have failed)."""
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap(module: nn.Module, dist: Dist) -> nn.Module:
    """``module`` in DistributedDataParallel when there are several ranks, else itself.

    Buffers are constants in these networks (no batch norm), so they are not re-broadcast every forward.
    """
    if not dist.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def micro_batches(batch_size: int, batch_per_device: int, dist: Dist, *, name: str) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of this rank for a global ``batch_size``; errors name ``name``."""
    if batch_size % dist.world_size:
        raise StageError(f"{name}.batch_size={batch_size} does not split over {dist.world_size} processes")
    share = batch_size // dist.world_size
    micro = batch_per_device or share
    if share % micro:
        raise StageError(f"{name}.batch_per_device={micro} does not divide the per-process batch {share} "
                         f"({name}.batch_size={batch_size} over {dist.world_size} processes)")
    return micro, share // micro


def shard(n: int, dist: Dist) -> slice:
    """This rank's contiguous share of a global batch of ``n``."""
    share = n // dist.world_size
    return slice(dist.rank * share, (dist.rank + 1) * share)


def sum_over_ranks(values: list[float], dist: Dist, device: str | torch.device) -> list[float]:
    """The sum of each value over the ranks (for logging); the values themselves with one process."""
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def run_on_ranks(base: Any, fn: Callable[[Dist, str], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Configure torch, join the torchrun process group if launched by it, run ``fn(dist, device)``, leave the group.

    ``fn`` returns its metrics on rank 0 and None on the other ranks.
    """
    setup_torch(base)
    dist, device = setup(base.device)
    try:
        return fn(dist, device)
    finally:
        teardown(dist)
