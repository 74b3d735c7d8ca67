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
    train_std: Tensor | None = None  # encode.posterior: sample: the VAE posterior's std, in the latents' units
    eval_std: Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    def training_set(self, split: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """What the training stages use: latents, labels and (``encode.posterior: sample``) the posterior's std of the
        ``train`` split, or of ``all`` images (train then eval)."""
        if split == "all":
            std = None if self.train_std is None else torch.cat([self.train_std, self.eval_std])
            return torch.cat([self.train, self.eval]), torch.cat([self.train_labels, self.eval_labels]), std
        return self.train, self.train_labels, self.train_std

    @property
    def num_classes(self) -> int:
        """The number of classes of the labels (the data stage's manifest, through ``codec.json``)."""
        if "num_classes" in self.codec:
            return int(self.codec["num_classes"])
        return int(max(self.train_labels.max(), self.eval_labels.max())) + 1  # latents written before it was recorded


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
    stds = [k for k in ("train_std", "eval_std") if k in t]
    if stds and len(stds) != 2:
        raise StageError(f"{path}: {stds[0]} without its other split's posterior std")
    for k in stds:
        split = k.removesuffix("_std")
        if t[k].shape != t[split].shape or not torch.isfinite(t[k]).all() or (t[k] < 0).any():
            raise StageError(f"{path}: {k} must be finite, >= 0 and shaped like {split} {list(t[split].shape)}")
    try:
        codec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{meta}: not valid JSON ({e})") from None
    return Latents(t["train"], t["train_labels"], t["eval"], t["eval_labels"], codec, t.get("train_std"), t.get("eval_std"))

