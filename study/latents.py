"""The encode stage's latents as the training and sampling stages read them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from study.errors import StageError
from study.files import read_tensors


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
    t = read_tensors(path, hint="run the encode stage first")
    if not meta.is_file():
        raise StageError(f"{meta}: not found (run the encode stage first)")
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

