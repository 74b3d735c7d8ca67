"""Stage ``classifier``: the two domain feature extractors behind ``fid_clf`` and ``fid_clf2``, trained on the
training split.

The networks and their weights files are :mod:`study.classifier` (which says why the study has its own feature
spaces, and why two).

Consumes ``data/prepared`` (``train`` and ``eval`` splits via :func:`study.images.load_split`). Produces ``OUT/``,
replaced whole and only on success:

- ``model.safetensors`` (clf) and ``model2.safetensors`` (clf2): the weights; the architecture is also stored in each
  file's metadata, so the file alone is enough to rebuild the network (:func:`study.classifier.load_classifier`);
- ``classifier.json``: architecture hyperparameters, input shape ``[C, H, W]``, num_classes, held-out accuracy and the
  sha256 of the weights of clf, and the same of clf2 under ``"second"``;
- ``metrics.json``: ``{"accuracy": ..., "accuracy2": ...}`` on the eval split; ``resolved_params.json``.

Training is seeded (clf from ``base.seed``, clf2 from ``base.seed + 1``: initialisation, batches and shifts); on CPU
two runs write byte-identical weights and ``classifier.json``.

Usage: ``python -m stages.classifier --params params.yaml --data data/prepared --out artifacts/classifier``
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from study.classifier import WEIGHTS, WEIGHTS2, Classifier, PooledClassifier, save_classifier
from study.cli import add_params_args, cli, load_args
from study.errors import StageError
from study.files import atomic_output_dir, check_paths, sha256_file, write_json, write_provenance
from study.images import load_split
from study.params import BaseParams, ClassifierParams, to_plain
from study.runtime import setup_torch

WARMUP_FRACTION = 0.05  # of the steps, linear learning-rate warm-up before the cosine decay


def random_shift(images: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each image by its own integer offset in ``[-max_shift, max_shift]²``, filling with zeros (black)."""
    if max_shift == 0:
        return images
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # (N, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = torch.arange(height)[None, :] + dy[:, None]  # (N, H)
    cols = torch.arange(width)[None, :] + dx[:, None]  # (N, W)
    crops = padded[torch.arange(n)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation.


def train_classifier(
    images: Tensor, labels: Tensor, params: ClassifierParams, seed: int, *, num_classes: int, device: str = "cpu",
    progress: bool = False, network: type[Classifier] | type[PooledClassifier] = Classifier, width: int | None = None,
    lr: float | None = None,
) -> Classifier | PooledClassifier:
    """Adam with linear warm-up and cosine decay on random shifts of the training images; returns the net in eval mode.

    ``network`` (of ``width`` channels, peak learning rate ``lr``; defaults ``params.width`` and ``params.lr``) is
    either classifier of :mod:`study.classifier`.
    """
    from study.progress import bar as progress_bar

    # Initialise from the seed without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = network(images.shape[1], tuple(images.shape[2:]), num_classes, width or params.width, params.feature_dim)
    net = net.to(device).train()
    peak_lr = lr or params.lr
    optimizer = torch.optim.Adam(net.parameters(), lr=peak_lr)
    generator = torch.Generator().manual_seed(seed)  # batches and shifts, drawn on the CPU whatever the device
    warmup = max(1, round(WARMUP_FRACTION * params.steps))

    bar = progress_bar(range(params.steps), desc=f"classifier: train {network.__name__}", unit="step", disable=not progress)
    for step in bar:
        # Learning rate: linear warm-up, then cosine decay to zero.
        progress_frac = (step - warmup) / max(1, params.steps - warmup)
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * progress_frac))
        for group in optimizer.param_groups:
            group["lr"] = peak_lr * scale

        # One step of cross-entropy on a shifted batch.
        index = torch.randint(0, len(images), (params.batch_size,), generator=generator)
        x = random_shift(images[index], params.max_shift, generator).to(device)
        loss = F.cross_entropy(net(x)[1], labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == params.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def accuracy(net: Classifier | PooledClassifier, images: Tensor, labels: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy of ``net`` on uint8 images, in batches."""
    device = next(net.parameters()).device
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size].to(device))[1]
        correct += int((logits.argmax(dim=1).cpu() == labels[start : start + batch_size]).sum())
    return correct / len(images)


# --------------------------------------------------------------------------------------------------------------
# The stage.


def _check_split(name: str, images: Tensor, labels: Tensor) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise StageError(f"classifier: {name} images must be uint8 (N, C, H, W), got {got}")
    if len(images) == 0:
        raise StageError(f"classifier: the {name} split is empty")
    if labels.shape != (len(images),) or labels.dtype != torch.int64:
        raise StageError(f"classifier: {name} labels must be int64 ({len(images)},), got {labels.dtype} {tuple(labels.shape)}")
    if bool((labels < 0).any()):
        raise StageError(f"classifier: the {name} split has unlabelled images (label -1); the classifier needs class labels")


def run(
    params: ClassifierParams,
    base: BaseParams,
    train: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    out_dir: Path,
    *,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train on ``train`` (uint8 images, int64 labels), measure accuracy on ``held_out``, write ``out_dir``.

    Returns the contents of ``classifier.json`` plus ``train_seconds`` (kept out of the files, which stay
    deterministic).
    """
    (train_x, train_y), (eval_x, eval_y) = train, held_out
    _check_split("train", train_x, train_y)
    _check_split("eval", eval_x, eval_y)
    if eval_x.shape[1:] != train_x.shape[1:]:
        raise StageError(f"classifier: eval images are {tuple(eval_x.shape[1:])}, train images {tuple(train_x.shape[1:])}")

    # Classes: 0..K-1, every one of them seen in training (a sorted, unshuffled split would fail here).
    num_classes = int(max(train_y.max(), eval_y.max())) + 1
    unseen = sorted(set(range(num_classes)) - set(train_y.unique().tolist()))
    if unseen:
        raise StageError(f"classifier: classes {unseen} have no training images (is the train/eval split shuffled?)")
    if num_classes < 2:
        raise StageError("classifier: the labels hold a single class; nothing to classify")

    start = time.perf_counter()
    net = train_classifier(train_x, train_y, params, base.seed, num_classes=num_classes, device=device, progress=progress)
    net2 = train_classifier(train_x, train_y, params, base.seed + 1, num_classes=num_classes, device=device,
                            progress=progress, network=PooledClassifier, width=params.width2, lr=params.lr2)
    train_seconds = time.perf_counter() - start
    acc, acc2 = accuracy(net, eval_x, eval_y), accuracy(net2, eval_x, eval_y)

    info = {
        **net.architecture,
        "input_shape": list(net.input_shape),
        "accuracy": acc,
        "n_train": len(train_x),
        "n_eval": len(eval_x),
        "weights": WEIGHTS,
        "accuracy2": acc2,
        "second": {**net2.architecture, "accuracy": acc2, "seed": base.seed + 1, "weights": WEIGHTS2},
    }
    with atomic_output_dir(Path(out_dir)) as tmp:
        save_classifier(net, tmp / WEIGHTS)
        save_classifier(net2, tmp / WEIGHTS2)
        info["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        info["second"]["weights_sha256"] = sha256_file(tmp / WEIGHTS2)
        write_json(tmp / "classifier.json", info)
        write_json(tmp / "metrics.json", {"accuracy": acc, "accuracy2": acc2})
        write_provenance(tmp, {"base": to_plain(base), "classifier": to_plain(params), "device": device},
                         seconds={"train": train_seconds})
    return {**info, "train_seconds": train_seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m stages.classifier",
        description="Train the two small CNNs whose features define fid_clf and fid_clf2 (and their KID and "
        "precision/recall) on the data/prepared train split, and report their accuracy on the eval split.",
    )
    add_params_args(parser)
    parser.add_argument("--data", type=Path, required=True, help="prepared-data directory (from the data stage)")
    parser.add_argument("--out", type=Path, required=True, help="output directory, replaced whole on success")
    args = parser.parse_args(argv)

    params = load_args(args)
    check_paths(inputs={"--data": args.data},
                outputs={"--out": args.out})
    device = setup_torch(params.base)
    train, held_out = load_split(args.data, "train"), load_split(args.data, "eval")
    result = run(params.classifier, params.base, train, held_out, args.out, device=device, progress=True)
    print(f"classifier: accuracy {result['accuracy']:.4f} (clf), {result['accuracy2']:.4f} (clf2) on {result['n_eval']} eval images "
          f"({result['n_train']} train, {params.classifier.steps} steps, {result['train_seconds']:.1f}s on {device}, "
          f"{torch.get_num_threads()} threads) -> {args.out}")
    return result


if __name__ == "__main__":
    raise SystemExit(cli(main))
