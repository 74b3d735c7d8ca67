"""Score a finished run's teacher and student on seed sets that the pipeline never samples.

The sample stage draws seed sets 0 … seed_sets − 1. Settings chosen by looking at those sets' FID are biased
towards them. This script scores the same models on other sets (default 3, 4, 5), exactly as the evaluate stage
does (against the eval split, in the feature spaces of both classifiers, `fid_clf` and `fid_clf2`, and with
`--inception` the Inception-v3's `fid_inception`), and prints mean ± std per method and the ratios to the teacher.

    python benchmarks/fresh_seeds.py --run . --scale cpu-s            # after `make repro`
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from study import params as study_params
from study.cli import cli
from study.codec import load_codec
from study.fidelity import classifier_space, compute_quality, inception_space
from study.images import load_split
from study.runtime import setup_torch
from study.layout import METHODS
from study.sampling import build_samplers, generate, load_models, seeds_of


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."), help="a project directory after `dvc repro`")
    parser.add_argument("--scale", required=True)
    parser.add_argument("--seed-sets", type=int, nargs="+", default=[3, 4, 5])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--inception", action="store_true", help="also fid_inception (minutes per 1,000 images on a CPU)")
    args = parser.parse_args(argv)

    run = args.run
    p = study_params.load(run / "params.yaml")
    device = setup_torch(p.base)
    codec = load_codec(run / "data/latents", device=device)
    reference, _ = load_split(run / "data/prepared", "eval")
    teacher, student = load_models(run / f"artifacts/{args.scale}/teacher", run / f"artifacts/{args.scale}/distill",
                                   args.scale, tuple(codec.latent_shape), device)
    samplers = build_samplers(p.sample, p.base.sigma_data, teacher, student)
    cache = run / ".cache/fidelity"
    spaces = [classifier_space(run / "artifacts/classifier"), classifier_space(run / "artifacts/classifier", second=True)]
    if args.inception:
        spaces.append(inception_space(p.evaluate.inception_weights, p.evaluate.inception_sha256, cache_dir=cache))
    fid: dict[str, dict[str, list[float]]] = {space.name: {m: [] for m in METHODS} for space in spaces}
    for m in METHODS:
        for k in args.seed_sets:
            images = generate(samplers[m], codec, seeds_of(k, args.num_samples), codec.latent_shape,
                              sigma_data=p.base.sigma_data, batch_size=p.sample.batch_size, device=device)
            for space in spaces:
                q = compute_quality(images, reference, space, kid_subset_size=p.evaluate.kid_subset_size,
                                    cache_dir=cache, reference_name="eval", prc=False, isc=False, device=device)
                fid[space.name][m].append(q[f"fid_{space.name}"])
    for name, per_method in fid.items():
        mean = {m: statistics.mean(v) for m, v in per_method.items()}
        for m, v in per_method.items():
            spread = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
            print(f"{args.scale} {m}: fid_{name} {mean[m]:.2f}{spread} over seed sets {args.seed_sets} "
                  f"({', '.join(f'{x:.2f}' for x in v)})")
        print(f"{args.scale} fid_{name} ratio to the teacher: 1-step {mean['scm1'] / mean['teacher']:.3f}, "
              f"2-step {mean['scm2'] / mean['teacher']:.3f}")


if __name__ == "__main__":
    raise SystemExit(cli(main))  # a missing run or model: one "error:" line, exit code 2
