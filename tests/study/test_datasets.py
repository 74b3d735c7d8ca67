"""CIFAR-10 in its real on-disk format, read without running pickled code (study/datasets.py)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from study import datasets
from study.errors import StageError
from helpers import CIFAR10_CLASSES, write_cifar10


def test_the_batch_folder_reads_as_the_official_splits(tmp_path: Path):
    write_cifar10(tmp_path, per_batch=3)
    train_x, train_y, test_x, test_y, names = datasets.read_cifar10(tmp_path, allow_download=False)
    assert train_x.shape == (15, 32, 32, 3) and train_x.dtype == np.uint8 and test_x.shape == (3, 32, 32, 3)
    assert names == list(CIFAR10_CLASSES) and train_y.dtype == np.int64 and len(test_y) == 3
    # Planar RGB rows become H×W×C: pixel (row 0, col 1) of image 0 is data[0, [1, 1025, 2049]].
    raw = datasets.load_array_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    data = raw[b"data"]
    assert list(train_x[0, 0, 1]) == [data[0, 1], data[0, 1025], data[0, 2049]]
    assert list(train_y[:3]) == raw[b"labels"]


def test_the_archive_is_extracted_and_a_missing_one_is_downloaded_with_its_sha256(tmp_path: Path, monkeypatch):
    archive = write_cifar10(tmp_path / "served", per_batch=2, archive=True)
    local = tmp_path / "local"
    local.mkdir()
    (local / archive.name).write_bytes(archive.read_bytes())
    assert datasets.read_cifar10(local, allow_download=False)[0].shape == (10, 32, 32, 3)
    assert (local / "cifar-10-batches-py" / "test_batch").is_file()

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    try:
        monkeypatch.setattr(datasets, "CIFAR10_URL", f"http://127.0.0.1:{httpd.server_address[1]}/{archive.name}")
        monkeypatch.setattr(datasets, "CIFAR10_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
        fresh = tmp_path / "fresh"
        assert datasets.read_cifar10(fresh)[2].shape == (2, 32, 32, 3)  # downloaded, verified, extracted
        monkeypatch.setattr(datasets, "CIFAR10_SHA256", "0" * 64)
        with pytest.raises(StageError, match="sha256"):
            datasets.read_cifar10(tmp_path / "tampered")
        assert not (tmp_path / "tampered" / "cifar-10-python.tar.gz").exists()
    finally:
        httpd.shutdown()
        httpd.server_close()


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_batch_file_that_would_run_code_is_refused_without_running(tmp_path: Path, monkeypatch):
    folder = write_cifar10(tmp_path, per_batch=2)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": [0, 1]}, protocol=2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"data_batch_3: not a CIFAR batch file \(UnpicklingError: global posix.system"):
        datasets.read_cifar10(tmp_path, allow_download=False)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("batch, named", [
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "'data' must be a uint8 array N×3072, got float32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "'labels' must hold 2 integers in 0..9"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "'data' must be a uint8 array N×3072, got uint8 [2, 100]"),
])
def test_a_malformed_batch_is_named(tmp_path: Path, batch, named):
    folder = write_cifar10(tmp_path, per_batch=2)
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(StageError, match=re.escape(f"test_batch: {named}")):
        datasets.read_cifar10(tmp_path, allow_download=False)
