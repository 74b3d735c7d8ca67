"""What the teacher and distill stages share: latents in, networks out, and one training loop.

Model files are single self-describing safetensors files: the weights plus, in the safetensors metadata, the JSON
network description (scale, U-Net config, latent shape, σ_d). They are never pickles, so loading runs no code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator
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
from scm.losses import LossOutput, optimizer_step
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
    if not torch.isfinite(t["train"]).all():
        raise StageError(f"{path}: the train latents contain NaN or inf")
    try:
        codec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{meta}: not valid JSON ({e})") from None
    return Latents(t["train"], t["train_labels"], t["eval"], t["eval_labels"], codec)


def minibatches(n: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless minibatch indices: a fresh seeded permutation every epoch (drop_last, wrapping across epochs)."""
    g = torch.Generator().manual_seed(seed)
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=g)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


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
    seconds: float
    skipped_steps: int


LossFn = Callable[[int, Tensor, torch.Generator], LossOutput]


def train(net: nn.Module, extra: list[nn.Parameter], loss_fn: LossFn, data: Tensor, *, steps: int, batch_size: int,
          optimizer: torch.optim.Optimizer, warmup_steps: int, lr: float, ema_half_life_kimg: float, seed: int,
          log_every: int, desc: str, max_nonfinite: int = 20, progress: bool = True) -> TrainResult:
    """Train ``net`` (and the ``extra`` parameters, e.g. w_φ) on ``data`` for ``steps`` minibatches.

    Progress is counted in images; EMA has a half-life in images; a step whose gradient norm is not finite is skipped
    and counted, and ``max_nonfinite`` such steps in a row stop training with an error naming the step.
    """
    device = next(net.parameters()).device
    params = list(net.parameters()) + list(extra)
    ema = EMA(net, half_life=ema_half_life_kimg * 1000)
    batches = minibatches(len(data), batch_size, seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    history: list[dict[str, float]] = []
    skipped = in_a_row = 0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        # Learning rate: linear warm-up, then constant.
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr

        # Loss, gradient, and a step only if the gradient is finite.
        x0 = data[next(batches)].to(device, non_blocking=True)
        out = loss_fn(step, x0, gen)
        grad_norm, stepped = optimizer_step(out.loss, params, optimizer)
        if stepped:
            in_a_row = 0
        else:
            skipped, in_a_row = skipped + 1, in_a_row + 1
            if in_a_row >= max_nonfinite:
                raise StageError(f"{desc}: {in_a_row} steps in a row with a non-finite gradient, the last at step {step} "
                                 f"(loss {out.loss.item():.4g}); lower the learning rate")
        ema.update(net, (step + 1) * batch_size, batch_size)

        # Log.
        if step % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - start
            row = {"step": step, "kimg": (step + 1) * batch_size / 1000, "loss": out.loss.item(),
                   "grad_norm": grad_norm, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_s": (step + 1) * batch_size / max(elapsed, 1e-9), "skipped": skipped, **out.stats}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
    if not math.isfinite(history[-1]["loss"]):
        raise StageError(f"{desc}: the final loss is not finite")
    return TrainResult(ema, history, time.perf_counter() - start, skipped)


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
