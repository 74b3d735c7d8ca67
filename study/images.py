"""The prepared image dataset on disk (``images.parquet`` + ``manifest.json``) and image grids.

The data stage writes the dataset; every later stage reads one split with :func:`load_split`, which checks the
parquet file's sha256 against the manifest before decoding anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from study.errors import StageError

if TYPE_CHECKING:
    import torch

PARQUET = "images.parquet"
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")


def read_manifest(prepared_dir: Path) -> dict[str, Any]:
    """The ``manifest.json`` of a prepared directory (shape, counts, num_classes, ...)."""
    path = Path(prepared_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the data stage first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None
    shape = manifest.get("shape") if isinstance(manifest, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)
            and isinstance(manifest.get("sha256"), str)):
        raise StageError(f"{path}: not a manifest written by the data stage (needs \"shape\": [C, H, W] and \"sha256\")")
    return manifest


def load_split(prepared_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``, in ``index`` order.

    The bytes of ``images.parquet`` are checked against the manifest's sha256 before anything is decoded.
    """
    import torch  # here, not at the top: preparing mnist5k and `--help` do not need torch's ~2 s import

    pixels, labels = decode_split(prepared_dir, split)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
    return images, torch.from_numpy(labels)


def decode_split(prepared_dir: Path, split: str, indices: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`load_split` without torch: uint8 ``(N, H, W, C)`` pixels and int64 labels, of the whole split or of the
    rows ``indices`` (decoding only those)."""
    if split not in SPLITS:
        raise StageError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    manifest = read_manifest(prepared_dir)
    path = Path(prepared_dir) / PARQUET
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StageError(f"{path}: not found (run the data stage first)") from None
    if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise StageError(f"{path}: sha256 does not match {MANIFEST} (the file changed after the data stage wrote it)")
    table = pq.read_table(pa.BufferReader(data), columns=["image", "label", "split"])
    rows = table.filter(pc.equal(table["split"], split))
    if indices is not None:
        rows = rows.take(pa.array(indices, pa.int64()))
    channels, height, width = manifest["shape"]
    pixels = np.empty((rows.num_rows, height, width, channels), np.uint8)  # (N, H, W, C)
    for i, png in enumerate(png_column(rows)):
        with Image.open(io.BytesIO(png), formats=["PNG"]) as im:
            decoded = np.asarray(im)
        if decoded.shape[:2] != (height, width) or decoded.size != pixels[i].size:
            raise StageError(f"{path}: a {split} image has shape {decoded.shape}, {MANIFEST} says {manifest['shape']}")
        pixels[i] = decoded.reshape(height, width, channels)
    return pixels, rows["label"].to_numpy().astype(np.int64)


def png_column(table: pa.Table) -> Iterator[bytes]:
    """The PNG bytes of every row, in order."""
    for chunk in table["image"].chunks:
        yield from (value.as_py() for value in chunk)


def class_interleaved(labels: list[int], n: int) -> list[int]:
    """Indices of ``n`` images that take the classes in turn: the first image of each class, then the second, ...
    (in split order within a class; unlabelled images, label −1, form one class)."""
    seen: dict[int, int] = {}
    rank = []
    for label in labels:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    return sorted(range(len(rank)), key=lambda i: (rank[i], labels[i], i))[:n]


def save_grid(path: Path, images: Any, columns: int, pad: int = 2) -> None:
    """Write uint8 N×C×H×W ``images`` (a tensor or an array) as one PNG, ``columns`` per row, separated by ``pad``
    gray pixels."""
    images = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 128, dtype=np.uint8)  # (H, W, C)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[top : top + h, left : left + w] = image.transpose(1, 2, 0)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
