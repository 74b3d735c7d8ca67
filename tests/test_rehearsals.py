"""Rehearsals of the paper's three GPU presets: each profile end to end through a real `dvc repro` on CPU, from data
in its real on-disk format, changing only sizes, never the code path.

- ``cifar10-gpu``: CIFAR-10 from ``data/raw/cifar-10-python.tar.gz``, the archive torchvision downloads, written
  here in its exact format (pickled batches); DDPM++, sCT.
- ``imagenet64-gpu``: an ImageNet-style folder of RGB JPEGs of mixed sizes and aspect ratios (ADM's centre crop and
  bicubic resize), class-conditional; EDM2's U-Net, sCT.
- ``imagenet512-gpu``: the same kind of folder through a local diffusers AutoencoderKL directory with
  ``stabilityai/sd-vae-ft-mse``'s exact configuration and random weights (the real ``from_pretrained`` path),
  class-conditional with label dropout; EDM2's U-Net, guided sCD, Table 6 guidance when sampling.

Shrunk: one scale at ``base.width=8``, a few steps of a few images, ``image_size`` 32 (IN64) and 64 (IN512: 8×8
latents), small sample sets. The Inception FID of the presets' protocol runs (its network ships with the test
dependencies); FD-DINOv2 has no weights offline and must say so. These run with ``make rehearse`` (and in CI), not
with ``make test``, to keep the latter under 20 minutes. ``SCM_REHEARSAL_DEVICE=cuda`` runs them on a GPU with the
presets' own bf16 (``benchmarks/rehearse_gpu.sh``); the default is the CPU, where precision is always float32.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import write_cifar10
from test_dvc_pipeline import _run, make_project

pytestmark = [pytest.mark.slow, pytest.mark.rehearsal]

DEVICE = os.environ.get("SCM_REHEARSAL_DEVICE", "cpu")
SHRINK = [f"base.device={DEVICE}", "base.width=8", "base.checkpoint_dir=''", "data.max_images=0",
          "classifier.steps=3", "classifier.batch_size=4", "classifier.width=8",
          "teacher.steps=3", "teacher.batch_size=4", "teacher.lr_warmup_steps=1", "teacher.log_every=1",
          "distill.steps=3", "distill.batch_size=4", "distill.lr_warmup_steps=1", "distill.log_every=1",
          "distill.tangent_warmup_steps=2",
          "sample.num_samples=4", "sample.seed_sets=1", "sample.teacher_steps=2", "sample.batch_size=4",
          "sample.grid_size=4", "evaluate.kid_subset_size=2", "evaluate.kid_subsets=2"]

# stabilityai/sd-vae-ft-mse's config.json, value for value (its weights here are random).
SD_VAE_FT_MSE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def write_jpeg_folder(root: Path, classes: int = 3, per_class: int = 7, seed: int = 0) -> None:
    """``root/<wnid>/*.JPEG``: RGB JPEGs of mixed sizes and aspect ratios whose colour says their class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"n0{c}000000"
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
            pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            pixels[..., c % 3] += np.uint8(120)
            Image.fromarray(pixels).save(folder / f"n0{c}000000_{i}.JPEG", quality=90)


def write_sd_vae(folder: Path) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**SD_VAE_FT_MSE).save_pretrained(folder, safe_serialization=True)


def rehearse(tmp_path: Path, profile: str, scale: str, extra: list[str]) -> tuple[Path, str]:
    """The project on ``profile`` with the shrinking overrides written as `reproduce -S` writes them, then `dvc repro`."""
    from pipeline.project import configure, write_params

    repo = make_project(tmp_path / profile, profile=profile)
    if profile == "cifar10-gpu":
        write_cifar10(repo / "data" / "raw", per_batch=4, archive=True)
    else:
        write_jpeg_folder(repo / "data" / "imagenet" / "train")
    if profile == "imagenet512-gpu":
        write_sd_vae(repo / "vae" / "sd-vae-ft-mse")
    write_params(configure(repo, profile, SHRINK + [f"base.scales=[{scale}]", *extra]))
    log = _run([sys.executable, "-m", "dvc", "repro"], repo, timeout=1200)
    return repo, log


def summary_of(repo: Path, profile: str) -> dict:
    return json.loads((repo / "reports" / profile / "summary.json").read_text())["scales"][0]


def test_cifar10_preset_from_the_torchvision_archive(tmp_path: Path):
    repo, log = rehearse(tmp_path, "cifar10-gpu", "ddpmpp", [])
    assert "Running stage 'evaluate@ddpmpp'" in log and "Running stage 'report'" in log
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["counts"] == {"train": 20, "eval": 4} and manifest["shape"] == [3, 32, 32]
    assert (repo / "data/raw/cifar-10-batches-py/test_batch").is_file()  # extracted from the archive
    entry = summary_of(repo, "cifar10-gpu")
    assert entry["distill_method"] == "sct" and entry["fid_inception"]["teacher"] > 0  # the real detector ran
    meta = json.loads((repo / "artifacts/ddpmpp/samples/sampling.json").read_text())
    assert meta["num_classes"] == 0 and meta["guidance"] == {"teacher": 1.0, "scm1": 1.0, "scm2": 1.0}


def test_imagenet64_preset_from_a_jpeg_folder(tmp_path: Path):
    repo, log = rehearse(tmp_path, "imagenet64-gpu", "S", ["data.image_size=32"])
    assert "Running stage 'report'" in log
    manifest = json.loads((repo / "data/prepared/manifest.json").read_text())
    assert manifest["shape"] == [3, 32, 32] and manifest["num_classes"] == 3
    from safetensors.torch import load_file

    samples = load_file(str(repo / "artifacts/S/samples/samples.safetensors"))
    assert samples["labels_s0"].max() < 3 and samples["teacher_s0"].shape == (4, 3, 32, 32)
    entry = summary_of(repo, "imagenet64-gpu")
    assert entry["distill_method"] == "sct" and entry["fid_inception"]["teacher"] > 0


def test_imagenet512_preset_through_the_sd_vae_with_labels_and_guidance(tmp_path: Path):
    repo, log = rehearse(tmp_path, "imagenet512-gpu", "S", ["data.image_size=64", "encode.pretrained=vae/sd-vae-ft-mse",
                                                            "encode.encode_batch_size=4"])
    assert "Running stage 'report'" in log
    codec = json.loads((repo / "data/latents/codec.json").read_text())
    assert codec["kind"] != "identity" and codec["latent_shape"] == [4, 8, 8] and codec["num_classes"] == 3
    assert codec["mean"] == pytest.approx([1.56, -0.695, 0.483, 0.729])  # the paper's pinned latent statistics
    from safetensors.torch import load_file

    latents = load_file(str(repo / "data/latents/latents.safetensors"))
    assert latents["train_std"].shape == latents["train"].shape  # posterior mean and std, a draw per use (EDM2)
    from safetensors import safe_open

    with safe_open(str(repo / "artifacts/S/distill/model.safetensors"), framework="pt") as f:
        student = json.loads(f.metadata()["scm"])
    assert student["network"]["guidance_embedding"] and student["guidance_max"] == 2.0
    meta = json.loads((repo / "artifacts/S/samples/sampling.json").read_text())
    assert meta["guidance"] == {"teacher": 1.4, "scm1": 1.5, "scm2": 1.4}  # Table 6 at S
    entry = summary_of(repo, "imagenet512-gpu")
    assert entry["distill_method"] == "scd" and entry["fid_inception"]["teacher"] > 0
    assert entry["fd_dinov2"]["teacher"] is None  # no DINOv2 weights offline: null, with its reason
