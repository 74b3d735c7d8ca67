"""Evaluate stage (per scale): sample quality through torch-fidelity, and sampling speed.

Consumes the scale's samples, the held-out eval split (the reference), the classifier (the ``clf`` feature space)
and the models (for timing). Produces ``metrics/<scale>/headline.json`` (the few numbers ``dvc metrics show``
lists), ``metrics/<scale>/evaluate.json`` (every headline number, flat) and ``artifacts/<scale>/evaluation.json``
(every number per seed set, the spread, and the protocol).

Protocol: for each method (teacher ODE at its default NFE, sCM 1-step, sCM 2-step, and the autoencoder's
reconstructions of the eval split = the rFID floor) and each of ``sample.seed_sets`` sets of ``sample.num_samples``
images, FID/KID/precision/recall against the ``evaluate.reference`` images (the eval split by default; ``all`` = every
prepared image, the paper's full-training-set statistics), in the feature spaces of the two classifiers (``*_clf``,
``*_clf2``, every seed set) and, when on, the StyleGAN/EDM Inception-v3 (``*_inception``) and DINOv2 (``fd_dinov2``),
on the first ``evaluate.detector_seed_sets`` sets. ``metrics/<scale>/evaluate.json`` holds the ``evaluate.headline``
statistic over seed sets (mean; EDM and the paper report the minimum of 3) and the spread. Speed: seconds per image
of each sampler on the same batch, back to back in one process after a warm-up (medians over repeats), the decoder
timed separately.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scm.samplers import labels_from_seeds, noise_from_seeds
from study import layout
from study.classifier import held_out_accuracy
from study.cli import add_params_args, cli, load_args
from study.codec import Codec, load_codec
from study.errors import StageError
from study.fidelity import FeatureSpace, classifier_space, compute_quality, dinov2_space, inception_space, summarise_seeds
from study.files import check_paths, read_tensors, write_json
from study.images import load_split
from study.layout import METHODS
from study.params import BaseParams, EvaluateParams, SampleParams, to_plain
from study.runtime import setup_torch
from study.sampling import Sampler, build_samplers, load_models

QUALITY_METHODS = (*METHODS, "recon")


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure_speed(samplers: dict[str, Sampler], codec: Codec, shape: tuple[int, ...], *, sigma_data: float,
                  batch_size: int, repeats: int, device: str) -> dict[str, Any]:
    """Seconds per image of each sampler (latents only) and of the decoder, on one batch, interleaved, medians."""
    noise = noise_from_seeds(range(batch_size), shape, 2, sigma_data=sigma_data, device=device)
    k = samplers["teacher"].num_classes
    labels = labels_from_seeds(range(batch_size), k, device=device) if k else None  # a guided teacher: 2 calls per NFE
    latents = samplers["scm1"](noise, labels)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    jobs = {m: (lambda s=samplers[m]: s(noise, labels)) for m in METHODS} | {"decoder": lambda: codec.decode(latents)}
    for fn in jobs.values():  # warm-up
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):
        for k, fn in jobs.items():
            times[k].append(timed(fn))
    spi = {k: statistics.median(v) / batch_size for k, v in times.items()}
    out: dict[str, Any] = {"batch_size": batch_size, "repeats": repeats, "device": str(device)}
    nfe_teacher = samplers["teacher"].nfe
    for m in METHODS:
        out[layout.metric("sec_per_image", m)] = spi[m] + spi["decoder"]
        out[f"images_per_s_{m}"] = 1 / (spi[m] + spi["decoder"])
        out[f"sampler_sec_per_image_{m}"] = spi[m]
        out[layout.nfe(m)] = samplers[m].nfe
    out["decoder_sec_per_image"] = spi["decoder"]
    for m in layout.STUDENTS:
        speedup = spi["teacher"] / spi[m]
        out[layout.speedup(m)] = speedup  # sampler only (the decoder is the same for every sampler)
        out[f"{layout.speedup(m)}_with_decoder"] = (spi["teacher"] + spi["decoder"]) / (spi[m] + spi["decoder"])
        out[f"{layout.speedup(m)}_fraction_of_nfe_ratio"] = speedup / (nfe_teacher / samplers[m].nfe)
    return out


def reference_images(prepared_dir: Path, reference: str) -> tuple[torch.Tensor, str]:
    """The reference images of ``evaluate.reference`` (a split, or every prepared image) and a line describing them."""
    if reference == "all":
        images = torch.cat([load_split(prepared_dir, split)[0] for split in ("train", "eval")])
        return images, f"every image of {prepared_dir} ({len(images)}: train and eval splits)"
    images = load_split(prepared_dir, reference)[0]
    return images, f"{reference} split of {prepared_dir} ({len(images)} images)"


def feature_spaces(params: EvaluateParams, classifier_dir: Path, cache_dir: Path) -> tuple[list[FeatureSpace], dict[str, str]]:
    """The feature spaces to score in, and one status line per space (``ok``, or why it is off or unavailable)."""
    spaces = [classifier_space(classifier_dir), classifier_space(classifier_dir, second=True)]
    status = {"clf": "ok", "clf2": "ok"}
    if params.inception == "on":
        spaces.append(inception_space(params.inception_weights, params.inception_sha256, cache_dir=cache_dir))
        status["inception"] = "ok"
    else:
        status["inception"] = "off (evaluate.inception: off; enable with -S evaluate.inception=on, cost in README \"Metrics\")"
    if params.dinov2 == "on":
        space, status["dinov2"] = dinov2_space(params.dinov2_weights)
        spaces += [space] if space else []
    else:
        status["dinov2"] = "off (evaluate.dinov2: off)"
    return spaces, status


def headline_metrics(summary: dict[str, dict[str, Any]], spaces: list[str], headline: str) -> dict[str, float]:
    """The flat metrics of ``metrics/<scale>/evaluate.json``: each metric's ``headline`` statistic over seed sets
    (``mean`` or ``min``), the spread of each Fréchet distance, and each student's ratio to the teacher per space."""
    flat: dict[str, float] = {}
    for m in QUALITY_METHODS:
        for name, s in summary[m].items():
            if isinstance(s, dict) and s["mean"] is not None:
                flat[layout.metric(name, m)] = s[headline]
                if s["std"] is not None and name.startswith(("fid", "fd_")):
                    flat[layout.metric_std(name, m)] = s["std"]
    for space in spaces:
        fd = layout.fd(space)
        teacher_fd = flat.get(layout.metric(fd, "teacher"))
        for m in layout.STUDENTS:
            if teacher_fd and layout.metric(fd, m) in flat:
                flat[layout.ratio(m, space)] = flat[layout.metric(fd, m)] / teacher_fd
    return flat


def headline(flat: dict[str, Any], spaces: list[str]) -> dict[str, dict[str, float]]:
    """``metrics/<scale>/headline.json``, the one DVC metric of a scale: Fréchet distance per sampler and feature
    space, each student's ratio to the teacher, the speedups and the classifiers' held-out accuracy, to 4 significant
    digits (``dvc metrics show``; every other number stays in ``metrics/<scale>/evaluate.json``)."""
    def pick(key: str) -> float | None:
        value = flat.get(key)
        return float(f"{value:.4g}") if isinstance(value, (int, float)) else None

    out: dict[str, dict[str, float]] = {}
    for space in spaces:
        fd = layout.fd(space)
        out[fd] = {m: pick(layout.metric(fd, m)) for m in layout.METHODS}
        out[f"ratio_{space}"] = {m: pick(layout.ratio(m, space)) for m in layout.STUDENTS}
    out["speedup"] = {m: pick(layout.speedup(m)) for m in layout.STUDENTS}
    out["accuracy"] = {"clf": pick("clf_accuracy"), "clf2": pick("clf2_accuracy")}
    return {group: {k: v for k, v in values.items() if v is not None} for group, values in out.items()
            if any(v is not None for v in values.values())}


def run(params: EvaluateParams, sample_params: SampleParams, base: BaseParams, scale: str, *,
        prepared_dir: Path, latents_dir: Path, teacher_dir: Path, student_dir: Path, samples_dir: Path,
        classifier_dir: Path, metrics_path: Path, details_path: Path, cache_dir: Path, device: str = "cpu",
        headline_path: Path | None = None, progress: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    reference, reference_text = reference_images(prepared_dir, params.reference)
    held_out, _ = load_split(prepared_dir, "eval")
    samples_file = Path(samples_dir) / layout.SAMPLES_FILE
    samples = read_tensors(samples_file, hint=f"run the sample stage for scale {scale!r} first")
    seed_sets = sorted(int(k.split("_s")[1]) for k in samples if re.fullmatch(r"seeds_s\d+", k))
    missing = [f"{m}_s{k}" for k in seed_sets for m in METHODS if f"{m}_s{k}" not in samples]
    if not seed_sets or missing:
        raise StageError(f"{samples_file}: not written by the sample stage (no seed sets, or missing {missing[:3]})")
    spaces, status = feature_spaces(params, classifier_dir, cache_dir)
    codec = load_codec(latents_dir, device=device)
    recon = codec.decode(codec.encode(held_out.to(device))).cpu()  # the autoencoder's floor (rFID)

    # Quality, per method and seed set, in every feature space (the detectors on the first detector_seed_sets).
    detector_sets = seed_sets[: params.detector_seed_sets or None]
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in QUALITY_METHODS}
    for m in QUALITY_METHODS:
        for k in seed_sets if m != "recon" else [0]:
            generated = recon if m == "recon" else samples[f"{m}_s{k}"]
            q: dict[str, Any] = {}
            for space in spaces:
                if space.name in ("clf", "clf2") or m == "recon" or k in detector_sets:
                    q |= compute_quality(generated, reference, space, kid_subset_size=params.kid_subset_size,
                                         kid_subsets=params.kid_subsets, prc=params.prc, cache_dir=cache_dir,
                                         reference_name=params.reference, device=device,
                                         verbose=progress and space.name in ("inception", "dinov2"))  # their bars
            per_seed[m].append(q)
            if progress:
                shown = ", ".join(f"{layout.fd(sp.name)} {q[layout.fd(sp.name)]:.3f}" for sp in spaces if layout.fd(sp.name) in q)
                print(f"evaluate-{scale}: {m} seed set {k}: {shown}", flush=True)
    summary = {m: summarise_seeds(v) for m, v in per_seed.items()}

    # Speed, back to back on one batch.
    teacher, student = load_models(teacher_dir, student_dir, scale, tuple(codec.latent_shape), device)
    samplers = build_samplers(sample_params, base.sigma_data, teacher, student)
    speed = measure_speed(samplers, codec, tuple(codec.latent_shape), sigma_data=base.sigma_data,
                          batch_size=min(sample_params.batch_size, 256), repeats=5, device=device)

    # Flat metrics for dvc (the headline statistic over seed sets, with the spread), and the full record.
    flat: dict[str, Any] = {"scale": scale, "n_samples": sample_params.num_samples, "seed_sets": len(seed_sets),
                            "headline": params.headline}
    flat |= headline_metrics(summary, [space.name for space in spaces], params.headline)
    flat |= {k: v for k, v in speed.items() if isinstance(v, (int, float))}
    flat["clf_accuracy"] = held_out_accuracy(classifier_dir)  # how good the fid_clf feature extractor is
    flat["clf2_accuracy"] = held_out_accuracy(classifier_dir, "accuracy2")
    flat["inception_status"], flat["dinov2_status"] = status["inception"], status["dinov2"]
    flat["wall_seconds"] = round(time.perf_counter() - start, 2)
    protocol = {"reference": reference_text, "generated_per_set": sample_params.num_samples, "seed_sets": seed_sets,
                "headline": f"{params.headline} over seed sets", "detector_seed_sets": detector_sets,
                "features": {"clf": f"penultimate layer of the classifier in {classifier_dir} (held-out accuracy "
                                    f"{flat['clf_accuracy']})",
                             "clf2": f"penultimate layer of the second classifier in {classifier_dir} (held-out "
                                     f"accuracy {flat['clf2_accuracy']})",
                             "inception": status["inception"], "dinov2": status["dinov2"]},
                "kid_subset_size": params.kid_subset_size, "speed": "median seconds per image over repeats, batch "
                f"{speed['batch_size']}, after one warm-up, samplers interleaved; decoder timed separately"}
    write_json(details_path, {"protocol": protocol, "summary": summary, "per_seed": per_seed, "speed": speed,
                              "params": {"base": to_plain(base), "sample": to_plain(sample_params),
                                         "evaluate": to_plain(params)}})
    write_json(metrics_path, flat)
    if headline_path is not None:
        write_json(headline_path, headline(flat, [space.name for space in spaces]))
    return flat


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--scale", required=True)
    parser.add_argument("--data", type=Path, default=Path(layout.PREPARED))
    parser.add_argument("--latents", type=Path, default=Path(layout.LATENTS))
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--samples", type=Path, required=True)
    parser.add_argument("--classifier", type=Path, default=Path(layout.CLASSIFIER))
    parser.add_argument("--metrics", type=Path, required=True, help="every headline number, flat JSON")
    parser.add_argument("--details", type=Path, required=True, help="full evaluation JSON (per seed set, protocol)")
    parser.add_argument("--headline", type=Path, default=None, help="the few numbers dvc metrics show lists (JSON)")
    parser.add_argument("--cache", type=Path, default=Path(".cache/fidelity"), help="cache of the reference images' features (safetensors)")
    args = parser.parse_args(argv)
    p = load_args(args).at(args.scale)  # per-scale values (the samplers' guidance) for this scale
    check_paths(inputs={"--data": args.data, "--latents": args.latents, "--teacher": args.teacher, "--student": args.student,
                 "--samples": args.samples, "--classifier": args.classifier},
                outputs={"--metrics": args.metrics, "--details": args.details, "--headline": args.headline,
                         "--cache": args.cache})
    device = setup_torch(p.base)
    m = run(p.evaluate, p.sample, p.base, args.scale, prepared_dir=args.data, latents_dir=args.latents,
            teacher_dir=args.teacher, student_dir=args.student, samples_dir=args.samples, classifier_dir=args.classifier,
            metrics_path=args.metrics, details_path=args.details, cache_dir=args.cache, device=device,
            headline_path=args.headline)
    ratios = "; ".join(f"{space} {m[layout.ratio('scm1', space)]:.2f}/{m[layout.ratio('scm2', space)]:.2f}"
                       for space in layout.FEATURE_SPACES if layout.ratio("scm2", space) in m)
    print(f"evaluate-{args.scale}: fid_clf teacher {m['fid_clf_teacher']:.3f}, scm1 {m['fid_clf_scm1']:.3f}, "
          f"scm2 {m['fid_clf_scm2']:.3f}, recon {m['fid_clf_recon']:.3f}; ratios 1-/2-step {ratios}; speedup scm2 "
          f"{m['speedup_scm2']:.1f}x ({m['speedup_scm2_fraction_of_nfe_ratio']:.2f} of the NFE ratio), "
          f"{m['wall_seconds']:.0f} s ({m['headline']} over seed sets)")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
