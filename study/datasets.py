"""CIFAR-10 in the layout torchvision and Keras use, read without running any pickled code.

The CIFAR-10 "python version" (``cifar-10-python.tar.gz``, the archive torchvision downloads) holds its batches as
Python pickles: ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` (each a dict with ``data``, a 10000×3072
uint8 array of planar RGB 32×32 images, and ``labels``), and ``batches.meta`` (``label_names``). An ordinary
``pickle.load`` of such a file runs whatever the file says; torchvision protects itself only by checking each file's
MD5 against the official ones, which also means it cannot read any other file of the same format.

:class:`ArrayUnpickler` resolves only the globals that rebuild NumPy arrays and bytes (``numpy`` ``ndarray``,
``dtype`` and ``_reconstruct``, ``_codecs.encode``); anything else (``os.system``, ``builtins.eval``, …) stops the
read with :class:`pickle.UnpicklingError` before it is called. :func:`read_cifar10` finds the batches under a root
(the extracted folder, or the archive, which it extracts safely), or downloads the official archive with its
sha256 first; every array is checked for shape, dtype and label range.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from study.errors import StageError
from study.fetch import download

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays, bytes and plain containers, and nothing else."""

    ALLOWED = frozenset({
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # arrays in protocol 5
        ("_codecs", "encode"),  # how protocol 2 stores bytes
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def load_array_pickle(path: Path) -> Any:
    """A pickled dataset file through :class:`ArrayUnpickler` (Python 2 strings read as latin-1, as torchvision does)."""
    try:
        with open(path, "rb") as f:
            return ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise StageError(f"{path}: not a CIFAR batch file ({type(e).__name__}: {str(e)[:200]})") from None


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise StageError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file as (uint8 images N×32×32×3, int64 labels)."""
    if not path.is_file():
        raise StageError(f"{path}: missing (a CIFAR-10 folder holds {', '.join(TRAIN_BATCHES)}, {TEST_BATCH}, {META})")
    batch = _str_keys(load_array_pickle(path), path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shown = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
        raise StageError(f"{path}: 'data' must be a uint8 array N×3072, got {shown}")
    labels = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if labels.shape != (len(data),) or (len(labels) and not (0 <= labels.min() and labels.max() < num_classes)):
        raise StageError(f"{path}: 'labels' must hold {len(data)} integers in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _extract(archive: Path, dest: Path) -> None:
    """Extract the archive's batch folder into ``dest``: regular files only, nothing outside ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).parts[:1] == (CIFAR10_FOLDER,)]
            if not members:
                raise StageError(f"{archive}: no {CIFAR10_FOLDER}/ folder in the archive")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise StageError(f"{archive}: cannot extract ({type(e).__name__}: {str(e)[:200]})") from None


def cifar10_folder(root: Path, *, allow_download: bool = True) -> Path:
    """The folder of batch files under ``root``: ``root`` itself, ``root/cifar-10-batches-py``, or the latter extracted
    from ``root/cifar-10-python.tar.gz``, which is downloaded (and its sha256 checked) when nothing is there."""
    root = Path(root).expanduser()
    for folder in (root, root / CIFAR10_FOLDER):
        if (folder / META).is_file():
            return folder
    archive = root / CIFAR10_ARCHIVE
    if not archive.is_file():
        if not allow_download:
            raise StageError(f"{root}: no CIFAR-10 here ({CIFAR10_FOLDER}/ or {CIFAR10_ARCHIVE})")
        download(CIFAR10_URL, CIFAR10_SHA256, archive)
    _extract(archive, root)
    return root / CIFAR10_FOLDER


def read_cifar10(root: Path, *, allow_download: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train images, train labels, test images, test labels, class names): 50,000 and 10,000 of the official splits
    (or however many the batch files hold), images uint8 N×32×32×3."""
    folder = cifar10_folder(root, allow_download=allow_download)
    meta = _str_keys(load_array_pickle(folder / META), folder / META)
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise StageError(f"{folder / META}: expected a list 'label_names'")
    class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    train = [_batch(folder / name, len(class_names)) for name in TRAIN_BATCHES]
    test_x, test_y = _batch(folder / TEST_BATCH, len(class_names))
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y, class_names)
