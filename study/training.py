"""The one training loop of the teacher and distill stages, driven by a small :class:`TrainSpec`.

What differs between the two stages (the objective, the network's initialisation, the optimiser) is in the spec and
the stage; everything else (the adaptive-weight head, data parallelism, micro-batches, the EMA, the learning-rate
warm-up, skipping non-finite steps, logging and checkpoints) is here, once.
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from scm.ema import EMA, PowerEMA
from scm.losses import LossOutput, Noise, step_if_finite
from scm.nn import AdaptiveWeight
from study import distributed
from study.checkpoint import Checkpointer, failpoint
from study.errors import StageError
from study.files import atomic_replace_file
from study.params import TrainingParams, per_scale_values
from study.progress import bar as progress_bar


class Minibatches:
    """Endless minibatch indices: a fresh seeded permutation every epoch (drop_last, wrapping across epochs).

    Its state (generator and the rest of the current permutation) goes into checkpoints, so a resumed run draws the
    same batches as an uninterrupted one.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        while len(self.buffer) < self.batch_size:
            self.buffer = torch.cat([self.buffer, torch.randperm(self.n, generator=self.generator)])
        batch, self.buffer = self.buffer[: self.batch_size], self.buffer[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state(), "buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])
        self.buffer = state["buffer"].clone()


# ---------------------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    ema: EMA | PowerEMA
    history: list[dict[str, float]]
    seconds: float  # training time over all attempts (resumed runs included)
    skipped_steps: int
    resumed_from: int  # the step this process started at (0: not resumed)


LossFn = Callable[..., LossOutput]  # (step, x0 micro-batch, its noise[, its class labels]) -> loss
SUMMED_STATS = ("nonfinite",)  # stats that add up over micro-batches and ranks; the rest are averaged


@dataclass(frozen=True)
class TrainSpec:
    """What makes a training run this run: its name, its objective, its optimiser and its seed.

    ``objective(net, head)`` returns the loss of one micro-batch, calling ``net`` and ``head`` (the adaptive weight
    w_φ, or None) as given: under torchrun they are the DistributedDataParallel wrappers. ``optimizer(parameters)``
    builds the optimiser over the network's and the head's parameters. ``settings`` is the stage's params section
    (``teacher`` or ``distill``), whose :class:`study.params.TrainingParams` keys the loop reads.
    """

    name: str  # "teacher-cpu-s": the progress bar and the first word of every error
    section: str  # "teacher" | "distill": the params section that errors point at
    objective: Callable[[nn.Module, nn.Module | None], LossFn]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    settings: TrainingParams
    seed: int  # minibatch order and noise


def make_optimizer(settings: TrainingParams) -> Callable[[list[nn.Parameter]], torch.optim.Optimizer]:
    """The optimiser ``settings`` name (Adam or RAdam, with its betas and ε), for :attr:`TrainSpec.optimizer`."""
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[settings.optimizer]
    return lambda params: cls(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps)


def learning_rate(settings: TrainingParams, step: int) -> float:
    """The learning rate of (0-based) ``step``: α_ref ramped up linearly over ``lr_warmup_steps``, then constant or
    EDM2's inverse square-root decay α_ref/√max(step/t_ref, 1) (Karras et al. 2024, Eq. 5)."""
    lr = settings.lr * (min(1.0, (step + 1) / settings.lr_warmup_steps) if settings.lr_warmup_steps else 1.0)
    if settings.lr_schedule == "inv_sqrt":
        lr /= math.sqrt(max(step / settings.lr_ref_steps, 1.0))
    return lr


def make_ema(net: nn.Module, settings: TrainingParams) -> EMA | PowerEMA:
    """The EMA ``settings`` name: a half-life in images (EDM) or EDM2's power function with σ_rel = ``ema_std``."""
    if settings.ema == "power":
        return PowerEMA(net, std=settings.ema_std)
    return EMA(net, half_life=settings.ema_half_life_kimg * 1000)


def rng_state(device: torch.device, noise: torch.Generator) -> dict[str, Tensor]:
    state = {"torch": torch.get_rng_state(), "noise": noise.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def train(net: nn.Module, spec: TrainSpec, data: Tensor, *, labels: Tensor | None = None,
          posterior_std: Tensor | None = None, dist: distributed.Dist = distributed.SINGLE,
          checkpoint: Checkpointer | None = None, progress: bool = True) -> TrainResult:
    """Train ``net`` on ``data`` as ``spec`` says, for ``spec.settings.steps`` optimiser steps.

    With ``labels`` (one class index per row of ``data``), the objective is called with each micro-batch's labels
    as a fourth argument, and the batch's noise carries ``c`` ~ U[0, 1) per sample (label dropout, guidance scale;
    :class:`scm.losses.Noise`), drawn after the rest so that an unconditional run draws what it always drew.

    With ``posterior_std`` (a VAE posterior's std per element of ``data``, which holds its mean), every use of an
    image draws a new latent x0 = mean + std·ε, EDM2's latent sampling; its ε comes last from the same generator.

    - Progress is counted in images; the EMA has a half-life in images or is EDM2's power function
      (:func:`make_ema`); the learning rate is a function of the step (:func:`learning_rate`), so it needs no
      scheduler state.
    - ``batch_size`` is the global batch. Under torchrun each rank takes its shard of the same global batch and noise
      and runs it in micro-batches of ``batch_per_device`` (:mod:`study.distributed`); DDP's gradient sync waits
      for the last micro-batch.
    - A step whose gradient norm is not finite is skipped and counted; ``max_nonfinite_steps`` such steps in a row
      stop training with an error naming the step (the last checkpoint is kept).
    - With a ``checkpoint``, the run resumes from its last checkpoint and saves one every ``checkpoint.every`` steps:
      weights, w_φ, EMA, optimiser, RNG and minibatch states, history. A resumed run on CPU reaches the same weights
      as an uninterrupted one, bit for bit.
    """
    settings = spec.settings
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"{spec.name}: {len(labels)} labels for {len(data)} training samples")
    if posterior_std is not None and posterior_std.shape != data.shape:
        raise ValueError(f"{spec.name}: posterior std of shape {list(posterior_std.shape)} for data {list(data.shape)}")
    unresolved = per_scale_values(settings)
    if unresolved:
        raise ValueError(f"{spec.name}: per-scale values ({', '.join(unresolved)}): resolve them with .at(scale) first")
    steps, batch_size = settings.steps, settings.batch_size
    desc = spec.name

    # The adaptive weight w_φ (paper Eq. 8), the optimiser, and the data-parallel wrappers the objective calls.
    device = next(net.parameters()).device
    head = AdaptiveWeight().to(device) if settings.adaptive_weight else None
    extra = list(head.parameters()) if head is not None else []
    params = list(net.parameters()) + extra
    optimizer = spec.optimizer(params)
    net_dp, head_dp = distributed.wrap(net, dist), (distributed.wrap(head, dist) if head is not None else None)
    ddp_modules = [m for m in (net_dp, head_dp) if m is not None] if dist.enabled else []
    loss_fn = spec.objective(net_dp, head_dp)

    # Batches, noise and the EMA.
    micro, rounds = distributed.micro_batches(batch_size, settings.batch_per_device, dist, name=spec.section)
    mine = distributed.shard(batch_size, dist)
    ema = make_ema(net, settings)
    batches = Minibatches(len(data), batch_size, spec.seed)
    gen = torch.Generator(device=device).manual_seed(spec.seed + 1)
    history: list[dict[str, float]] = []
    first_step, skipped, in_a_row, seconds_before = 0, 0, 0, 0.0
    trained = 0  # samples of this rank that a finite step trained on (not skipped, not masked as non-finite)

    # Resume: the newest checkpoint of this very run (same parameters, inputs and code) that fits it, if any.
    expected = {"step": 0, "net": net.state_dict(), "extra": [p.detach() for p in extra], "ema": ema.state_dict(),
                "optimizer": {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]},
                "batches": {"generator": batches.generator.get_state(), "buffer": None}, "rng": rng_state(device, gen),
                "skipped": 0, "in_a_row": 0, "trained": 0, "history": None, "seconds": 0.0}
    state = checkpoint.restore(expected) if checkpoint is not None else None
    for note in checkpoint.notes if checkpoint is not None and progress and dist.is_main else []:
        tqdm.write(f"{desc}: {note}", file=sys.stderr)
    if state is not None:
        net.load_state_dict(state["net"])
        for p, value in zip(extra, state["extra"], strict=True):
            p.data.copy_(value)
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        set_rng_state(state["rng"], device, gen)
        first_step, skipped, in_a_row, trained = state["step"], state["skipped"], state["in_a_row"], state["trained"]
        history, seconds_before = state["history"], state["seconds"]

    def snapshot(steps_done: int) -> dict[str, Any]:
        return {"step": steps_done, "net": net.state_dict(), "extra": [p.detach() for p in extra],
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "batches": batches.state_dict(),
                "rng": rng_state(device, gen), "skipped": skipped, "in_a_row": in_a_row, "trained": trained,
                "history": history, "seconds": seconds_before + time.perf_counter() - start}

    start = time.perf_counter()
    bar = progress_bar(range(first_step, steps), initial=first_step, total=steps, desc=desc, unit="step",
                       mininterval=1.0, disable=not (progress and dist.is_main))
    for step in bar:
        failpoint("step")

        # Learning rate: ramp-up, then constant or inverse square root.
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step)

        # The global batch and its noise, identical on every rank; this rank keeps its shard.
        index = next(batches)[mine]
        noise = Noise.draw((batch_size, *data.shape[1:]), generator=gen, device=device,
                           conditional=labels is not None)[mine]
        latent_eps = (torch.randn((batch_size, *data.shape[1:]), generator=gen, device=device)[mine]
                      if posterior_std is not None else None)

        # Gradients of the shard, micro-batch by micro-batch; DDP averages them over the ranks on the last one.
        optimizer.zero_grad(set_to_none=True)
        losses, stats = [], []
        for i in range(rounds):
            part = slice(i * micro, (i + 1) * micro)
            x0 = data[index[part]].to(device, non_blocking=True)
            if latent_eps is not None:  # a fresh draw from the image's VAE posterior
                x0 = x0 + posterior_std[index[part]].to(device, non_blocking=True) * latent_eps[part]
            with contextlib.ExitStack() as no_sync:
                if i < rounds - 1:
                    for m in ddp_modules:
                        no_sync.enter_context(m.no_sync())
                if labels is None:
                    out = loss_fn(step, x0, noise[part])
                else:
                    out = loss_fn(step, x0, noise[part], labels[index[part]].to(device, non_blocking=True))
                (out.loss / rounds).backward()
            losses.append(out.loss.detach())
            stats.append(out.stats)

        # A step only if the gradient is finite.
        grad_norm, stepped = step_if_finite(params, optimizer)
        if stepped:
            in_a_row = 0
            trained += micro * rounds - sum(int(s.get("nonfinite", 0)) for s in stats)
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= settings.max_nonfinite_steps:
                raise StageError(f"{desc}: {in_a_row} steps in a row with a non-finite gradient, the last at step {step} "
                                 f"(loss {torch.stack(losses).mean().item():.4g}); "
                                 f"{_after_streak(checkpoint, step + 1 - in_a_row, spec.section)}")
        ema.update(net, (step + 1) * batch_size, batch_size)

        # Log: the loss and stats of the global batch (averaged over micro-batches and ranks).
        if step % settings.log_every == 0 or step == steps - 1:
            keys, parts = list(stats[0]), rounds * dist.world_size
            totals = distributed.sum_over_ranks([torch.stack(losses).sum().item()] +
                                                [sum(s[k] for s in stats) for k in keys], dist, device)
            logged = {k: v if k in SUMMED_STATS else v / parts for k, v in zip(keys, totals[1:])}
            elapsed = time.perf_counter() - start
            row = {"step": step, "kimg": (step + 1) * batch_size / 1000, "loss": totals[0] / parts, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": (step + 1 - first_step) * batch_size / max(elapsed, 1e-9),
                   "skipped": skipped, "time": round(time.time(), 3), **logged}  # time: Unix seconds (MLflow timestamps)
            history.append(row)
            shown = {"mse": f"{row['mse']:.4f}"} if "mse" in row else {"loss": f"{row['loss']:.4f}"}  # as plotted
            if "r" in row:
                shown["r"] = f"{row['r']:.2f}"  # the tangent warm-up
            bar.set_postfix(**shown, avg_img_s=f"{row['images_per_s']:.0f}")

        # Checkpoint (rank 0; every rank holds the same state).
        if checkpoint is not None and dist.is_main and checkpoint.due(step + 1, steps):
            checkpoint.save(lambda: snapshot(step + 1))
    bar.close()
    if not math.isfinite(history[-1]["loss"]):
        raise StageError(f"{desc}: the final loss is not finite")
    if distributed.sum_over_ranks([float(trained)], dist, device)[0] == 0:
        raise StageError(f"{desc}: no step trained on a finite sample ({skipped} of {steps} steps skipped, the "
                         f"others' samples all masked as non-finite); lower {spec.section}.lr")
    return TrainResult(ema, history, seconds_before + time.perf_counter() - start, skipped, first_step)


def _after_streak(checkpoint: Checkpointer | None, streak_start: int, section: str) -> str:
    """The advice after a non-finite streak that began at ``streak_start``; keeps only checkpoints from before it.

    The update of step ``streak_start − 1`` was finite but led to the streak, so only checkpoints taken at or before
    it are kept. A re-run with a lower ``lr`` resumes from the one kept (the learning rate may change on resume).
    """
    kept = checkpoint.keep_before(streak_start) if checkpoint is not None else None
    if kept is None:
        return f"lower {section}.lr and re-run (no checkpoint from before step {streak_start} to resume)"
    return f"lower {section}.lr and re-run: it resumes from {kept}, taken before the streak"


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """The training log as CSV (for ``dvc plots``)."""
    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_replace_file(Path(path), write)
