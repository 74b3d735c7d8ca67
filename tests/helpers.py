"""Helpers shared by test packages: the temporary git + DVC project of ``tests/test_dvc_pipeline.py``.

``make_project`` and ``run`` are that module's own functions, loaded by path (the tests directory is not a package),
so every suite builds its project the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

_spec = importlib.util.spec_from_file_location("_dvc_pipeline_helpers", TESTS / "test_dvc_pipeline.py")
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module
_spec.loader.exec_module(_module)

make_project = _module.make_project  # (dest, profile="smoke") -> a fresh git + DVC repository with the project's code
run = _module._run  # (args, cwd, **kw) -> output; asserts exit code 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Prefect: what the flow tests read back from the server.


def prefect_env(api_url: str, **extra: str) -> dict[str, str]:
    """The environment of a Prefect CLI subprocess talking to the test server."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    env.update(PREFECT_API_URL=api_url, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), **extra)
    return env


def task_runs(flow_run_id) -> dict[str, Any]:
    """The task runs of one flow run, by name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def logs(task_run_id=None, flow_run_id=None, expect: str | None = None, timeout: float = 20.0) -> list[str]:
    """Log messages stored by the server for a task or flow run (waiting up to ``timeout`` for ``expect``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTaskRunId

    flt = LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id])) if task_run_id else \
        LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    while True:
        with get_client(sync_client=True) as client:
            messages, offset = [], 0
            while batch := client.read_logs(log_filter=flt, limit=200, offset=offset):
                messages += [log.message for log in batch]
                offset += len(batch)
        if expect is None or any(expect in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def artifacts(flow_run_id) -> dict[str, Any]:
    """The artifacts created in one flow run, by key."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found if a.key}


def wait_for_flow_run(flow_run_id, timeout: float = 300.0, poll: float = 1.0):
    """Poll the server until the flow run is in a final state; return that flow run."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} still {run.state.name if run.state else 'pending'} after {timeout} s")
            time.sleep(poll)


def sh(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run a command that must succeed (with this environment, or ours); its output."""
    import subprocess

    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


# Params: the default profile of the repository's params.yaml, the one source of every value.


def section(name: str, **changes: Any) -> Any:
    """The ``name`` section of the default profile, with ``changes`` applied (a frozen dataclass, as the stages get)."""
    import dataclasses

    from study.params import load

    params = load(ROOT / "params.yaml", profile="default")
    return dataclasses.replace(getattr(params, name), **changes)


def default_raw() -> dict:
    """The repository's params.yaml as parsed YAML (every section of the default profile, and the profiles)."""
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def params_text(partial: str) -> str:
    """A complete params.yaml: the repository's, with the sections of the YAML text ``partial`` merged on top."""
    import yaml

    from study.params import deep_merge

    return yaml.safe_dump(deep_merge(default_raw(), yaml.safe_load(partial) or {}), sort_keys=False, allow_unicode=True)


def write_latents(folder: Path, shape=(2, 8, 8), n_train: int = 16, n_eval: int = 8, num_classes: int | None = 10) -> Path:
    """An encode-stage output directory (identity codec) of random latents with the data's σ_d = 0.5, labelled
    i mod 10 (``num_classes`` None: a ``codec.json`` without the number of classes, as written before it was)."""
    import json

    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"train": 0.5 * torch.randn(n_train, *shape, generator=g), "eval": 0.5 * torch.randn(n_eval, *shape, generator=g),
               "train_labels": torch.arange(n_train) % 10, "eval_labels": torch.arange(n_eval) % 10},
              str(folder / "latents.safetensors"))
    codec = {"kind": "identity", "latent_shape": list(shape), "image_shape": list(shape), "mean": [0.0] * shape[0],
             "std": [0.5] * shape[0], "sigma_data": 0.5}
    (folder / "codec.json").write_text(json.dumps(codec if num_classes is None else {**codec, "num_classes": num_classes}))
    return folder


# Synthetic labelled images for the classifier and the metrics (tests/stages/test_classifier.py, tests/study/test_fidelity.py).


def shapes(n: int, seed: int, size: int = 16, classes: tuple[int, ...] = (0, 1, 2, 3)) -> tuple[Any, Any]:
    """Synthetic labelled uint8 (N, 1, size, size) images: a horizontal bar, a vertical bar, a diagonal or a hollow
    square, at a random place and brightness, on a noisy black background."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    x = torch.zeros(n, size, size)
    corner = torch.randint(1, size - 8, (n, 2), generator=g).tolist()
    brightness = (150 + 105 * torch.rand(n, generator=g)).tolist()
    for i, (label, (r, c), b) in enumerate(zip(labels.tolist(), corner, brightness)):
        if label == 0:
            x[i, r + 3, c : c + 7] = b
        elif label == 1:
            x[i, r : r + 7, c + 3] = b
        elif label == 2:
            x[i, torch.arange(r, r + 7), torch.arange(c, c + 7)] = b
        else:
            x[i, r : r + 6, c : c + 6] = b
            x[i, r + 1 : r + 5, c + 1 : c + 5] = 0
    x = x + 12 * torch.randn(n, size, size, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8).unsqueeze(1), labels  # (N, 1, H, W), (N,)


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Blurry random blobs, uint8 N×C×H×W."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 3, 3, generator=g)
    return (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)


def write_prepared(root: Path, images: torch.Tensor, n_eval: int) -> Path:
    """images.parquet (index, PNG bytes, label, split) and manifest.json (shape, sha256), as stages/data.py writes them."""
    root.mkdir(parents=True)
    rows = []
    for i, image in enumerate(images):
        array = image.permute(1, 2, 0).numpy()  # (H, W, C)
        png = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(png, format="PNG")
        split = "train" if i < len(images) - n_eval else "eval"
        rows.append({"index": i, "image": png.getvalue(), "label": i % 10, "split": split})
    pd.DataFrame(rows).astype({"index": "int64", "label": "int64"}).to_parquet(root / "images.parquet", index=False)
    sha256 = hashlib.sha256((root / "images.parquet").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps({"shape": list(images.shape[1:]), "sha256": sha256}))
    return root


def tiny_latents(tmp_path: Path, codec: str, **encode_changes: Any) -> Path:
    """The encode stage's output for 24 tiny 1×8×8 images: a 2-step AutoencoderKL (``codec="train"``) or pixels."""
    from stages import encode

    prepared = write_prepared(tmp_path / "prepared", synthetic_images(24, 1, 8), n_eval=8)
    params = section("encode", codec=codec, channels=(8, 16), latent_channels=2, steps=2, batch_size=8,
                     encode_batch_size=16, checkpoint_every=0, **encode_changes)
    encode.run(params, section("base"), prepared, tmp_path / "latents")
    return tmp_path / "latents"


def tiny_student(tmp_path: Path, shape: tuple[int, ...]) -> Path:
    """``tmp_path/student/model.safetensors``: a random tiny U-Net in the project's model format."""
    from scm import nn as scm_nn
    from study.models import save_model

    torch.manual_seed(1)
    cfg = scm_nn.UNetConfig(in_channels=shape[0], model_channels=8, channel_mult=(1, 2), groups=4)
    net = scm_nn.UNet(cfg)
    for p in net.parameters():  # a net whose output depends on its input (zero-initialised output layers otherwise)
        p.data.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "student" / "model.safetensors"
    path.parent.mkdir()
    save_model(path, net, {"role": "student-sct", "scale": "cpu-xs", "latent_shape": list(shape), "sigma_data": 0.5})
    return path.parent


def stage_images(latents: Path, student: Path, seeds: list[int], method: str) -> torch.Tensor:
    """What the sample stage stores for these seeds (study.sampling, the sample stage's own code)."""
    from study.codec import load_codec
    from study.models import load_model
    from study.sampling import build_samplers, generate

    codec = load_codec(latents)
    net, _ = load_model(student)
    samplers = build_samplers(section("sample", t_mid=1.1, teacher_steps=2), 0.5, net, net)
    return generate(samplers[method], codec, seeds, codec.latent_shape, sigma_data=0.5, batch_size=3, device="cpu")


# CIFAR-10 in the exact on-disk layout of its "python version" (what torchvision downloads and extracts).

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_cifar10(root: Path, per_batch: int = 4, *, seed: int = 0, archive: bool = False) -> Path:
    """``root/cifar-10-batches-py/``: ``data_batch_1..5`` and ``test_batch`` (pickled dicts of a uint8 N×3072
    planar-RGB ``data`` array, ``labels``, ``batch_label`` and ``filenames``, keys as Python 2 wrote them: bytes) and
    ``batches.meta``; with ``archive``, packed as ``root/cifar-10-python.tar.gz`` instead. Returns the folder or the
    archive."""
    import pickle
    import shutil
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = [int(c) for c in rng.integers(0, 10, per_batch)]
        # Images whose colour says their class, so a classifier and a teacher have something to learn.
        data = rng.integers(0, 64, (per_batch, 3, 32, 32), dtype=np.uint8)
        for i, c in enumerate(labels):
            data[i, c % 3] += np.uint8(60 + 19 * c)
        batch = {b"batch_label": f"batch {b}".encode(), b"labels": labels, b"data": data.reshape(per_batch, 3072),
                 b"filenames": [f"img_{b}_{i}.png".encode() for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    if not archive:
        return folder
    path = Path(root) / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    shutil.rmtree(folder)
    return path
