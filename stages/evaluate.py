"""Evaluate stage (per scale): sample quality through torch-fidelity, and sampling speed.

Consumes the scale's samples, the held-out eval split (the reference), the classifier (the ``clf`` feature space)
and the models (for timing). Produces ``metrics/<scale>/evaluate.json`` (flat, for ``dvc metrics``) and
``artifacts/<scale>/evaluation.json`` (every number per seed set, the spread, and the protocol).

Protocol: for each method (teacher ODE at its default NFE, sCM 1-step, sCM 2-step, and the autoencoder's
reconstructions of the eval split = the rFID floor) and each of ``sample.seed_sets`` sets of ``sample.num_samples``
images, FID/KID/precision/recall against all eval-split images, in the classifier's feature space (``*_clf``) and,
when its weights are available, Inception-v3 (``*_inception``). Speed: seconds per image of each sampler on the same
batch, back to back in one process after a warm-up (medians over repeats), the decoder timed separately.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from scm.samplers import noise_from_seeds
from study import layout
from study.classifier import held_out_accuracy
from study.cli import add_params_args, cli, load_args
from study.codec import Codec, load_codec
from study.errors import StageError
from study.fidelity import compute_quality, summarise_seeds
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
    latents = samplers["scm1"](noise)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    jobs = {m: (lambda s=samplers[m]: s(noise)) for m in METHODS} | {"decoder": lambda: codec.decode(latents)}
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


def run(params: EvaluateParams, sample_params: SampleParams, base: BaseParams, scale: str, *,
        prepared_dir: Path, latents_dir: Path, teacher_dir: Path, student_dir: Path, samples_dir: Path,
        classifier_dir: Path, metrics_path: Path, details_path: Path, cache_dir: Path, device: str = "cpu",
        progress: bool = True) -> dict[str, Any]:
    start = time.perf_counter()
    reference, _ = load_split(prepared_dir, "eval")
    samples_file = Path(samples_dir) / layout.SAMPLES_FILE
    samples = read_tensors(samples_file, hint=f"run the sample stage for scale {scale!r} first")
    seed_sets = sorted(int(k.split("_s")[1]) for k in samples if re.fullmatch(r"seeds_s\d+", k))
    missing = [f"{m}_s{k}" for k in seed_sets for m in METHODS if f"{m}_s{k}" not in samples]
    if not seed_sets or missing:
        raise StageError(f"{samples_file}: not written by the sample stage (no seed sets, or missing {missing[:3]})")
    codec = load_codec(latents_dir, device=device)
    recon = codec.decode(codec.encode(reference.to(device))).cpu()

    # Quality, per method and seed set, in the classifier's feature space (and Inception's when available).
    per_seed: dict[str, list[dict[str, Any]]] = {m: [] for m in QUALITY_METHODS}
    inception_status = "disabled (evaluate.inception: off)"
    for m in QUALITY_METHODS:
        for k in seed_sets if m != "recon" else [0]:
            generated = recon if m == "recon" else samples[f"{m}_s{k}"]
            q = compute_quality(generated, reference, features="clf", classifier_dir=classifier_dir,
                                kid_subset_size=params.kid_subset_size, kid_subsets=params.kid_subsets, prc=params.prc,
                                cache_dir=cache_dir, reference_name="eval", device=device)
            if params.inception != "off" and k == seed_sets[0]:
                qi = compute_quality(generated, reference, features="inception", inception_weights=params.inception_weights or None,
                                     kid_subset_size=params.kid_subset_size, kid_subsets=params.kid_subsets, prc=params.prc,
                                     cache_dir=cache_dir, reference_name="eval", device=device)
                inception_status = qi.pop("inception_status", "ok")
                q |= qi
            per_seed[m].append(q)
            if progress:
                print(f"evaluate-{scale}: {m} seed set {k}: fid_clf {q['fid_clf']:.3f}", flush=True)
    summary = {m: summarise_seeds(v) for m, v in per_seed.items()}

    # Speed, back to back on one batch.
    teacher, student = load_models(teacher_dir, student_dir, scale, tuple(codec.latent_shape), device)
    samplers = build_samplers(sample_params, base.sigma_data, teacher, student)
    speed = measure_speed(samplers, codec, tuple(codec.latent_shape), sigma_data=base.sigma_data,
                          batch_size=min(sample_params.batch_size, 256), repeats=5, device=device)

    # Flat metrics for dvc (means over seed sets, with their std), and the full record.
    flat: dict[str, Any] = {"scale": scale, "n_samples": sample_params.num_samples, "seed_sets": len(seed_sets)}
    for m in QUALITY_METHODS:
        for name, s in summary[m].items():
            if isinstance(s, dict) and s["mean"] is not None:
                flat[layout.metric(name, m)] = s["mean"]
                if s["std"] is not None and name.startswith("fid"):
                    flat[layout.metric_std(name, m)] = s["std"]
    teacher_fid = flat.get(layout.metric("fid_clf", "teacher"))
    for m in layout.STUDENTS:
        if teacher_fid:
            flat[layout.ratio(m)] = flat[layout.metric("fid_clf", m)] / teacher_fid
    flat |= {k: v for k, v in speed.items() if isinstance(v, (int, float))}
    flat["clf_accuracy"] = held_out_accuracy(classifier_dir)  # how good the fid_clf feature extractor is
    flat["inception_status"] = inception_status
    flat["wall_seconds"] = round(time.perf_counter() - start, 2)
    protocol = {"reference": f"eval split of {prepared_dir} ({len(reference)} images)",
                "generated_per_set": sample_params.num_samples, "seed_sets": seed_sets,
                "features": {"clf": f"penultimate layer of the classifier in {classifier_dir} (held-out accuracy "
                                    f"{flat['clf_accuracy']})", "inception": inception_status},
                "kid_subset_size": params.kid_subset_size, "speed": "median seconds per image over repeats, batch "
                f"{speed['batch_size']}, after one warm-up, samplers interleaved; decoder timed separately"}
    write_json(details_path, {"protocol": protocol, "summary": summary, "per_seed": per_seed, "speed": speed,
                              "params": {"base": to_plain(base), "sample": to_plain(sample_params),
                                         "evaluate": to_plain(params)}})
    write_json(metrics_path, flat)
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
    parser.add_argument("--metrics", type=Path, required=True, help="flat metrics JSON (dvc metrics)")
    parser.add_argument("--details", type=Path, required=True, help="full evaluation JSON")
    parser.add_argument("--cache", type=Path, default=Path(".cache/fidelity"), help="cache of the reference images' features (safetensors)")
    args = parser.parse_args(argv)
    p = load_args(args)
    check_paths(inputs={"--data": args.data, "--latents": args.latents, "--teacher": args.teacher, "--student": args.student,
                 "--samples": args.samples, "--classifier": args.classifier},
                outputs={"--metrics": args.metrics, "--details": args.details, "--cache": args.cache})
    device = setup_torch(p.base)
    m = run(p.evaluate, p.sample, p.base, args.scale, prepared_dir=args.data, latents_dir=args.latents,
            teacher_dir=args.teacher, student_dir=args.student, samples_dir=args.samples, classifier_dir=args.classifier,
            metrics_path=args.metrics, details_path=args.details, cache_dir=args.cache, device=device)
    print(f"evaluate-{args.scale}: fid_clf teacher {m['fid_clf_teacher']:.3f}, scm1 {m['fid_clf_scm1']:.3f}, "
          f"scm2 {m['fid_clf_scm2']:.3f}, recon {m['fid_clf_recon']:.3f}; speedup scm2 {m['speedup_scm2']:.1f}x "
          f"({m['speedup_scm2_fraction_of_nfe_ratio']:.2f} of the NFE ratio), {m['wall_seconds']:.0f} s")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
