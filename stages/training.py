"""What the teacher and distill stages share: latents in, networks out, and one training loop.

Model files are single self-describing safetensors files: the weights plus, in the safetensors metadata, the JSON
network description (scale, U-Net config, latent shape, σ_d). They are never pickles, so loading runs no code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm import tqdm

from scm import nn as snn
from scm.ema import EMA
from scm.losses import LossOutput, Noise, step_if_finite
from stages import distributed
from stages.checkpoint import Checkpointer, failpoint
from stages.common import StageError, atomic_replace_file

MODEL_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Latents.


@dataclass
class Latents:
    train: Tensor
    train_labels: Tensor
    eval: Tensor
    eval_labels: Tensor
    codec: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_latents(latents_dir: Path) -> Latents:
    """The encode stage's standardised latents and codec description."""
    latents_dir = Path(latents_dir)
    path, meta = latents_dir / "latents.safetensors", latents_dir / "codec.json"
    for p in (path, meta):
        if not p.is_file():
            raise StageError(f"{p}: not found (run the encode stage first)")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise StageError(f"{path}: not a readable safetensors file ({e})") from None
    missing = {"train", "eval", "train_labels", "eval_labels"} - set(t)
    if missing:
        raise StageError(f"{path}: missing tensors {sorted(missing)}")
    if len(t["train"]) == 0:
        raise StageError(f"{path}: the train split is empty")
    if t["train"].ndim != 4 or t["eval"].shape[1:] != t["train"].shape[1:]:
        raise StageError(f"{path}: expected train/eval latents of shape (N, C, H, W) alike, "
                         f"got {list(t['train'].shape)} and {list(t['eval'].shape)}")
    for split in ("train", "eval"):
        if not torch.isfinite(t[split]).all():
            raise StageError(f"{path}: the {split} latents contain NaN or inf")
    try:
        codec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{meta}: not valid JSON ({e})") from None
    return Latents(t["train"], t["train_labels"], t["eval"], t["eval_labels"], codec)


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
# Networks on disk.


def build_net(scale: str, latent_shape: tuple[int, ...], dropout: float = 0.0) -> snn.UNet:
    try:
        return snn.UNet(snn.unet_config(scale, in_channels=latent_shape[0], dropout=dropout))
    except ValueError as e:
        raise StageError(f"base.scales: {e}") from None


def save_model(path: Path, net: nn.Module, meta: dict[str, Any]) -> None:
    """Weights + JSON description in one safetensors file, written atomically."""
    info = {**meta, "unet": dataclasses.asdict(net.cfg), "n_params": snn.count_params(net)}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_replace_file(Path(path), lambda tmp: save_file(state, str(tmp), metadata={"scm": json.dumps(info)}))


def read_model_meta(path: Path, *, name: str | None = None) -> dict[str, Any]:
    """The JSON description a model file carries; errors begin with ``name`` (default: the path)."""
    who = name or path
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            head = b""
        pickle = head.startswith((b"PK\x03\x04", b"\x80"))  # torch.save's zip container, or a bare pickle
        hint = "; it looks like a pickle checkpoint (torch.save), refused: unpickling can run code" if pickle else ""
        raise StageError(f"{who}: not a readable safetensors model file ({str(e).splitlines()[0]}){hint}") from None
    if "scm" not in meta:
        raise StageError(f"{who}: no 'scm' metadata: not a model file written by this project")
    try:
        info = json.loads(meta["scm"])
    except json.JSONDecodeError as e:
        raise StageError(f"{who}: the 'scm' metadata is not valid JSON ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("unet"), dict):
        raise StageError(f"{who}: the 'scm' metadata does not describe a network (no 'unet' mapping)")
    return info


def load_model(path: Path, *, expect_shape: tuple[int, ...] | None = None, expect_scale: str | None = None,
               device: str | torch.device = "cpu", name: str | None = None) -> tuple[snn.UNet, dict[str, Any]]:
    """Load a model file (or a directory holding ``model.safetensors``); check it fits the data and the scale.

    Errors begin with ``name`` (default: the path), e.g. the user's ``teacher.source`` when ``path`` is a fetched copy.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    who = name or path
    if not path.is_file():
        raise StageError(f"{who}: model file not found")
    meta = read_model_meta(path, name=name)
    if expect_scale is not None and meta.get("scale") != expect_scale:
        raise StageError(f"{who}: a model of scale {meta.get('scale')!r}, but scale {expect_scale!r} was asked for")
    if expect_shape is not None and tuple(meta.get("latent_shape", ())) != tuple(expect_shape):
        raise StageError(f"{who}: trained on latents of shape {tuple(meta.get('latent_shape', ()))}, "
                         f"but the data has shape {tuple(expect_shape)}")
    try:
        cfg = snn.UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["unet"].items()})
        net = snn.UNet(cfg)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as e:
        raise StageError(f"{who}: the 'scm' metadata describes no valid network "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    try:
        net.load_state_dict(load_file(str(path)))
    except (RuntimeError, SafetensorError) as e:
        raise StageError(f"{who}: weights do not match the network they describe ({' '.join(str(e).split())[:300]})") from None
    return net.to(device).eval().requires_grad_(False), meta


# ---------------------------------------------------------------------------------------------------------------
# The loop.


@dataclass
class TrainResult:
    ema: EMA
    history: list[dict[str, float]]
    seconds: float  # training time over all attempts (resumed runs included)
    skipped_steps: int
    resumed_from: int  # the step this process started at (0: not resumed)


LossFn = Callable[[int, Tensor, Noise], LossOutput]  # (step, x0 micro-batch, its noise) -> loss
SUMMED_STATS = ("nonfinite",)  # stats that add up over micro-batches and ranks; the rest are averaged


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


def train(net: nn.Module, extra: list[nn.Parameter], loss_fn: LossFn, data: Tensor, *, steps: int, batch_size: int,
          optimizer: torch.optim.Optimizer, warmup_steps: int, lr: float, ema_half_life_kimg: float, seed: int,
          log_every: int, desc: str, section: str = "teacher", max_nonfinite: int = 20, progress: bool = True,
          dist: distributed.Dist = distributed.SINGLE, batch_per_device: int = 0, ddp_modules: Sequence[nn.Module] = (),
          checkpoint: Checkpointer | None = None) -> TrainResult:
    """Train ``net`` (and the ``extra`` parameters, e.g. w_φ) on ``data`` for ``steps`` optimiser steps.

    - Progress is counted in images; the EMA has a half-life in images; the learning rate is a function of the step
      (linear warm-up, then constant), so it needs no scheduler state.
    - ``batch_size`` is the global batch. Under torchrun each rank takes its shard of the same global batch and noise
      and runs it in micro-batches of ``batch_per_device`` (:mod:`stages.distributed`); ``ddp_modules`` are the
      DistributedDataParallel wrappers whose gradient sync waits for the last micro-batch.
    - A step whose gradient norm is not finite is skipped and counted; ``max_nonfinite`` such steps in a row stop
      training with an error naming the step (the last checkpoint is kept).
    - With a ``checkpoint``, the run resumes from its last checkpoint and saves one every ``checkpoint.every`` steps:
      weights, EMA, optimiser, RNG and minibatch states, history. A resumed run on CPU reaches the same weights as
      an uninterrupted one, bit for bit.
    """
    device = next(net.parameters()).device
    params = list(net.parameters()) + list(extra)
    micro, rounds = distributed.micro_batches(batch_size, batch_per_device, dist, name=section)
    mine = distributed.shard(batch_size, dist)
    ema = EMA(net, half_life=ema_half_life_kimg * 1000)
    batches = Minibatches(len(data), batch_size, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    history: list[dict[str, float]] = []
    first_step, skipped, in_a_row, seconds_before = 0, 0, 0, 0.0

    # Resume: the newest checkpoint of this very run (same parameters and inputs), if any.
    state = checkpoint.restore() if checkpoint is not None else None
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
        first_step, skipped, in_a_row = state["step"], state["skipped"], state["in_a_row"]
        history, seconds_before = state["history"], state["seconds"]

    def snapshot(steps_done: int) -> dict[str, Any]:
        return {"step": steps_done, "net": net.state_dict(), "extra": [p.detach() for p in extra],
                "ema": ema.state_dict(), "optimizer": optimizer.state_dict(), "batches": batches.state_dict(),
                "rng": rng_state(device, gen), "skipped": skipped, "in_a_row": in_a_row, "history": history,
                "seconds": seconds_before + time.perf_counter() - start}

    start = time.perf_counter()
    bar = tqdm(range(first_step, steps), initial=first_step, total=steps, desc=desc, dynamic_ncols=True,
               mininterval=1.0, disable=not (progress and dist.is_main))
    for step in bar:
        failpoint("step")

        # Learning rate: linear warm-up, then constant.
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr

        # The global batch and its noise, identical on every rank; this rank keeps its shard.
        index = next(batches)[mine]
        noise = Noise.draw((batch_size, *data.shape[1:]), generator=gen, device=device)[mine]

        # Gradients of the shard, micro-batch by micro-batch; DDP averages them over the ranks on the last one.
        optimizer.zero_grad(set_to_none=True)
        losses, stats = [], []
        for i in range(rounds):
            part = slice(i * micro, (i + 1) * micro)
            x0 = data[index[part]].to(device, non_blocking=True)
            with contextlib.ExitStack() as no_sync:
                if i < rounds - 1:
                    for m in ddp_modules:
                        no_sync.enter_context(m.no_sync())
                out = loss_fn(step, x0, noise[part])
                (out.loss / rounds).backward()
            losses.append(out.loss.detach())
            stats.append(out.stats)

        # A step only if the gradient is finite.
        grad_norm, stepped = step_if_finite(params, optimizer)
        if stepped:
            in_a_row = 0
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= max_nonfinite:
                kept = f"; the last checkpoint is kept in {checkpoint.directory}" if checkpoint and checkpoint.enabled else ""
                raise StageError(f"{desc}: {in_a_row} steps in a row with a non-finite gradient, the last at step {step} "
                                 f"(loss {torch.stack(losses).mean().item():.4g}); lower {section}.lr{kept}")
        ema.update(net, (step + 1) * batch_size, batch_size)

        # Log: the loss and stats of the global batch (averaged over micro-batches and ranks).
        if step % log_every == 0 or step == steps - 1:
            keys, parts = list(stats[0]), rounds * dist.world_size
            totals = distributed.sum_over_ranks([torch.stack(losses).sum().item()] +
                                                [sum(s[k] for s in stats) for k in keys], dist, device)
            logged = {k: v if k in SUMMED_STATS else v / parts for k, v in zip(keys, totals[1:])}
            elapsed = time.perf_counter() - start
            row = {"step": step, "kimg": (step + 1) * batch_size / 1000, "loss": totals[0] / parts, "grad_norm": grad_norm,
                   "lr": optimizer.param_groups[0]["lr"], "images_per_s": (step + 1 - first_step) * batch_size / max(elapsed, 1e-9),
                   "skipped": skipped, **logged}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")

        # Checkpoint (rank 0; every rank holds the same state).
        if checkpoint is not None and dist.is_main and checkpoint.due(step + 1, steps):
            checkpoint.save(lambda: snapshot(step + 1))
    bar.close()
    if not math.isfinite(history[-1]["loss"]):
        raise StageError(f"{desc}: the final loss is not finite")
    return TrainResult(ema, history, seconds_before + time.perf_counter() - start, skipped, first_step)


# ---------------------------------------------------------------------------------------------------------------
# What the training stages share around the loop: precision and processes.

def amp_dtype(precision: str, device: str) -> torch.dtype | None:
    """The one precision decision of the training stages: bf16 autocast on CUDA if asked; CPU always float32."""
    return torch.bfloat16 if precision == "bf16" and str(device).startswith("cuda") else None


def add_training_args(parser: argparse.ArgumentParser) -> None:
    """The arguments the teacher and distill CLIs share (besides the params arguments)."""
    parser.add_argument("--scale", required=True, help=f"model scale ({', '.join(snn.SCALES)})")
    parser.add_argument("--latents", type=Path, default=Path("data/latents"), help="encode stage output")
    parser.add_argument("--out", type=Path, required=True, help="output directory, replaced whole on success")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    parser.add_argument("--history", type=Path, required=True, help="training-curve CSV to write")


def run_on_ranks(base: Any, fn: Callable[[distributed.Dist, str], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Configure torch, join the torchrun process group if launched by it, run ``fn(dist, device)``, leave the group.

    ``fn`` returns its metrics on rank 0 and None on the other ranks.
    """
    from stages.common import setup_torch

    setup_torch(base)
    dist, device = distributed.setup(base.device)
    try:
        return fn(dist, device)
    finally:
        distributed.teardown(dist)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """The training log as CSV (for ``dvc plots``)."""
    import csv

    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    atomic_replace_file(Path(path), write)
