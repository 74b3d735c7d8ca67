"""The GPU presets against the paper (sCM v2, arXiv 2410.11081, App. G and Tables 4-5), value for value.

Each row: profile, the dotted key, the scale it is read at (None: not per scale), the paper's value, and where the
paper (or EDM/EDM2, which App. G defers to) gives it. A later edit of params.yaml that drifts from the paper fails
here. "k" iterations in Table 4 are thousands, except 1048k = 2^20 (EDM2's 2048 Mimg at batch 2048).
"""

from __future__ import annotations

import pytest

from scm.networks import SCALES
from study.files import REPO_ROOT
from study.params import load

IN_SCALES = ("S", "M", "L", "XL")
IN512_SCALES = (*IN_SCALES, "XXL")


def per_scale(key, values, source, scales):
    return [(key, s, v, f"{source}, {s}") for s, v in zip(scales, values)]


PAPER = {
    "cifar10-gpu": [
        ("base.scales", None, ("ddpmpp",), "Table 4, CIFAR-10: DDPM++"),
        ("encode.codec", None, "identity", "Table 4: pixel space"),
        ("teacher.batch_size", None, 512, "Table 4, CIFAR-10 teacher: batch 512 (EDM)"),
        ("teacher.steps", None, 400_000, "Table 4, CIFAR-10 teacher: 400k iterations"),
        ("teacher.optimizer", None, "adam", "Table 4, CIFAR-10 teacher: Adam (EDM)"),
        ("teacher.betas", None, (0.9, 0.999), "Table 4, CIFAR-10 teacher: β (0.9, 0.999)"),
        ("teacher.eps", None, 1e-8, "Table 4, CIFAR-10 teacher: ε 1e-8"),
        ("teacher.lr", None, 1e-3, "Table 4, CIFAR-10 teacher: lr 1e-3"),
        ("teacher.lr_warmup_steps", None, 19_531, "EDM CIFAR-10: ramp-up 10 Mimg at batch 512"),
        ("teacher.dropout", None, 0.13, "Table 4, CIFAR-10 teacher: dropout 0.13 (EDM)"),
        ("teacher.ema_half_life_kimg", None, 500.0, "EDM CIFAR-10: EMA half-life 0.5 Mimg"),
        ("distill.method", None, "sct", "Table 1: sCT is the CIFAR-10 headline (2.85 / 2.06)"),
        ("distill.batch_size", None, 512, "Table 4, CIFAR-10 CM: batch 512"),
        ("distill.optimizer", None, "radam", "Table 4, CIFAR-10 CM: RAdam"),
        ("distill.betas", None, (0.9, 0.99), "Table 4, CIFAR-10 CM: β (0.9, 0.99)"),
        ("distill.eps", None, 1e-8, "Table 4, CIFAR-10 CM: ε 1e-8"),
        ("distill.lr", None, 1e-4, "Table 4, CIFAR-10 CM: lr 1e-4"),
        ("distill.lr_schedule", None, "constant", "Table 4, CIFAR-10 CM: no learning-rate schedule"),
        ("distill.P_mean", None, -1.0, "Table 4, CIFAR-10 CM: P_mean -1.0"),
        ("distill.P_std", None, 1.4, "Table 4, CIFAR-10 CM: P_std 1.4"),
        ("distill.tangent_c", None, 0.1, "§4.2 / Table 4: c = 0.1"),
        ("distill.tangent_warmup_steps", None, 10_000, "§4.2 / Table 4: H = 10k"),
        ("distill.dropout", None, 0.2, "Table 4, CIFAR-10 sCT: dropout 0.20"),
        ("distill.ema_half_life_kimg", None, 500.0, "Table 4, CIFAR-10 CM: EMA half-life 0.5 Mimg"),
        ("sample.teacher_steps", None, 18, "Table 4: teacher DPM-Solver-2S, 18 steps (NFE 35)"),
        ("base.conditional", None, False, "App. G: CIFAR-10 is unconditional"),
        ("base.train_split", None, "train", "EDM: the 50k training images, never the test split"),
    ],
    "imagenet64-gpu": [
        ("base.scales", None, IN_SCALES, "Table 4, ImageNet 64: S, M, L, XL"),
        ("encode.codec", None, "identity", "Table 4: pixel space"),
        ("teacher.batch_size", None, 2048, "Table 4, IN64: batch 2048"),
        ("teacher.optimizer", None, "adam", "App. G: EDM2 config G"),
        ("teacher.betas", None, (0.9, 0.99), "Table 4, IN64: Adam β (0.9, 0.99)"),
        ("teacher.eps", None, 1e-11, "Table 4, IN64: Adam ε 1e-11"),
        ("teacher.lr_schedule", None, "inv_sqrt", "App. G: EDM2's inverse square-root decay"),
        ("teacher.lr_ref_steps", None, 35_000, "Table 4, IN64: t_ref 35000"),
        ("teacher.P_mean", None, -0.8, "Table 4, IN64 teacher: P_mean -0.8"),
        ("teacher.P_std", None, 1.6, "Table 4, IN64 teacher: P_std 1.6"),
        ("teacher.ema", None, "power", "App. G: EDM2's power-function EMA"),
        *per_scale("teacher.steps", (1_048_576, 1_486_000, 761_000, 540_000), "Table 4, IN64 teacher iterations", IN_SCALES),
        *per_scale("teacher.lr", (1e-2, 9e-3, 8e-3, 7e-3), "Table 4, IN64 teacher α_ref", IN_SCALES),
        *per_scale("teacher.dropout", (0.0, 0.1, 0.1, 0.1), "Table 4, IN64 teacher dropout", IN_SCALES),
        *per_scale("teacher.ema_std", (0.075, 0.06, 0.04, 0.04), "App. G, IN64 teacher σ_rel", IN_SCALES),
        ("distill.method", None, "sct", "Table 1: sCT is the IN64 headline (XL 2.04 / 1.48)"),
        ("distill.steps", None, 400_000, "Table 4, IN64 sCT: 400k iterations"),
        ("distill.batch_size", None, 2048, "Table 4, IN64: batch 2048"),
        ("distill.betas", None, (0.9, 0.99), "Table 4, IN64 CM: Adam β (0.9, 0.99)"),
        ("distill.eps", None, 1e-11, "Table 4, IN64 CM: Adam ε 1e-11"),
        ("distill.lr_ref_steps", None, 35_000, "Table 4, IN64: t_ref 35000"),
        ("distill.P_mean", None, -1.0, "Table 4, IN64 CM: P_mean -1.0"),
        ("distill.P_std", None, 1.6, "Table 4, IN64 CM: P_std 1.6"),
        *per_scale("distill.lr", (1e-4, 9e-5, 8e-5, 7e-5), "Table 4, IN64 CM α_ref", IN_SCALES),
        ("distill.dropout", None, 0.45, "Table 4, IN64 sCT: dropout 45%"),
        ("distill.dropout_levels", None, (2, 3), "Table 4, IN64 sCT: dropout at resolutions ≤ 16 (levels 2, 3 of 64²)"),
        ("distill.ema_std", None, 0.05, "App. G: CMs sample from σ_rel = 0.05"),
        ("sample.teacher_steps", None, 32, "Table 8: teacher NFE 63"),
        ("base.conditional", None, True, "App. G: ImageNet 64 is class-conditional"),
        ("data.transform", None, "center-crop-dhariwal", "App. G defers to EDM2: ADM's centre crop and bicubic resize"),
        ("base.train_split", None, "all", "EDM2: trained on the whole training set, FID against all of it"),
        ("distill.guidance_max", None, 1.0, "App. G: sCT takes no guidance (IN64's headline is sCT)"),
    ],
    "imagenet512-gpu": [
        ("base.scales", None, IN512_SCALES, "Table 4, ImageNet 512: S … XXL"),
        ("encode.pretrained", None, "stabilityai/sd-vae-ft-mse", "App. G: the SD VAE ft-MSE"),
        ("encode.latent_mean", None, (1.56, -0.695, 0.483, 0.729), "App. G: latent channel means"),
        ("encode.latent_std", None, (5.27, 5.91, 4.21, 4.31), "App. G: latent channel stds"),
        ("encode.posterior", None, "sample", "EDM2: latents stored as posterior mean and std, one drawn per use"),
        ("teacher.batch_size", None, 2048, "Table 4, IN512: batch 2048"),
        ("teacher.betas", None, (0.9, 0.99), "Table 4, IN512: Adam β (0.9, 0.99)"),
        ("teacher.eps", None, 1e-11, "Table 4, IN512: Adam ε 1e-11"),
        ("teacher.lr_schedule", None, "inv_sqrt", "App. G: EDM2's inverse square-root decay"),
        ("teacher.lr_ref_steps", None, 70_000, "Table 4, IN512: t_ref 70000"),
        ("teacher.P_mean", None, -0.4, "Table 4, IN512 teacher: P_mean -0.4"),
        ("teacher.P_std", None, 1.0, "Table 4, IN512 teacher: P_std 1.0"),
        ("teacher.ema", None, "power", "App. G: EDM2's power-function EMA"),
        *per_scale("teacher.steps", (1_048_576, 1_048_576, 696_000, 598_000, 376_000), "Table 4, IN512 teacher iterations", IN512_SCALES),
        *per_scale("teacher.lr", (1e-2, 9e-3, 8e-3, 7e-3, 6.5e-3), "Table 4, IN512 teacher α_ref", IN512_SCALES),
        *per_scale("teacher.dropout", (0.0, 0.1, 0.1, 0.1, 0.1), "Table 4, IN512 teacher dropout", IN512_SCALES),
        *per_scale("teacher.ema_std", (0.025, 0.03, 0.015, 0.02, 0.015), "App. G, IN512 teacher σ_rel", IN512_SCALES),
        ("distill.method", None, "scd", "Table 2: sCD is the IN512 headline (XXL 2.28 / 1.88)"),
        ("distill.steps", None, 200_000, "Table 4, IN512 sCD: 200k iterations"),
        ("distill.batch_size", None, 2048, "Table 4, IN512: batch 2048"),
        ("distill.eps", None, 1e-11, "Table 4, IN512 CM: Adam ε 1e-11"),
        ("distill.lr_ref_steps", None, 70_000, "Table 4, IN512: t_ref 70000"),
        ("distill.P_mean", None, -0.8, "Table 4, IN512 CM: P_mean -0.8"),
        ("distill.P_std", None, 1.6, "Table 4, IN512 CM: P_std 1.6"),
        *per_scale("distill.lr", (1e-4, 9e-5, 8e-5, 7e-5, 6.5e-5), "Table 4, IN512 CM α_ref", IN512_SCALES),
        *per_scale("distill.dropout", (0.0, 0.1, 0.1, 0.1, 0.1), "Table 4, IN512 sCD dropout", IN512_SCALES),
        ("distill.ema_std", None, 0.05, "App. G: CMs sample from σ_rel = 0.05"),
        ("sample.teacher_steps", None, 32, "Table 2: teacher NFE 63"),
        ("base.conditional", None, True, "App. G: ImageNet 512 is class-conditional"),
        ("data.transform", None, "center-crop-dhariwal", "App. G defers to EDM2: ADM's centre crop and bicubic resize"),
        ("base.train_split", None, "all", "EDM2: trained on the whole training set, FID against all of it"),
        ("teacher.label_dropout", None, 0.1, "App. G, IN512: label dropout 0.1"),
        ("distill.guidance_max", None, 2.0, "Table 4, IN512 sCD: max CFG 2.0 (s ~ U[1, 2])"),
        *per_scale("sample.teacher_guidance", (1.4, 1.2, 1.2, 1.2, 1.2), "Table 6, IN512 teacher guidance", IN512_SCALES),
        *per_scale("sample.guidance_1step", (1.5, 1.3, 1.3, 1.3, 1.3), "Table 6, IN512 sCD 1-step guidance", IN512_SCALES),
        *per_scale("sample.guidance_2step", (1.4, 1.2, 1.2, 1.2, 1.2), "Table 6, IN512 sCD 2-step guidance", IN512_SCALES),
    ],
}

ROWS = [(profile, *row) for profile, rows in PAPER.items() for row in rows]


@pytest.fixture(scope="module")
def presets():
    return {profile: load(REPO_ROOT / "params.yaml", profile) for profile in PAPER}


@pytest.mark.parametrize("profile, key, scale, paper, source", ROWS,
                         ids=[f"{r[0]}:{r[1]}{'@' + r[2] if r[2] else ''}" for r in ROWS])
def test_preset_value_is_the_papers(presets, profile, key, scale, paper, source):
    params = presets[profile]
    if scale is not None:
        params = params.at(scale)
    section, name = key.split(".")
    value = getattr(getattr(params, section), name)
    assert value == paper, f"{profile} {key}{'@' + scale if scale else ''} = {value!r}, paper ({source}): {paper!r}"


def test_presets_use_the_papers_networks(presets):
    assert {SCALES[s].network for s in presets["cifar10-gpu"].base.scales} == {"ddpmpp"}
    for profile in ("imagenet64-gpu", "imagenet512-gpu"):
        assert {SCALES[s].network for s in presets[profile].base.scales} == {"mpunet"}
        assert [SCALES[s].model_channels for s in presets[profile].base.scales] == [192, 256, 320, 384, 448][: len(presets[profile].base.scales)]


def test_dry_run_shows_the_values_of_the_scale_asked_for():
    import subprocess
    import sys

    import yaml

    out = subprocess.run([sys.executable, "-m", "stages.teacher", "--profile", "imagenet512-gpu", "--scale", "L",
                          "--dry-run", "--out", "unused", "--metrics", "unused.json", "--history", "unused.csv"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert (shown["teacher"]["steps"], shown["teacher"]["lr"], shown["teacher"]["ema_std"]) == (696_000, 0.008, 0.015)
    assert shown["distill"]["lr"] == 8e-5
