"""Score a finished run's teacher and student on seed sets that the pipeline never samples.

The sample stage draws seed sets 0 … seed_sets − 1. Settings chosen by looking at those sets' FID are biased
towards them. This script scores the same models on other sets (default 3, 4, 5), exactly as the evaluate stage
does (`fid_clf` against the eval split), and prints mean ± std per method and the ratios to the teacher.

    python benchmarks/fresh_seeds.py --run . --scale cpu-s            # after `make repro`
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from study import params as study_params
from study.cli import cli
from study.codec import load_codec
from study.fidelity import compute_quality
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
    args = parser.parse_args(argv)

    run = args.run
    p = study_params.load(run / "params.yaml")
    device = setup_torch(p.base)
    codec = load_codec(run / "data/latents", device=device)
    reference, _ = load_split(run / "data/prepared", "eval")
    teacher, student = load_models(run / f"artifacts/{args.scale}/teacher", run / f"artifacts/{args.scale}/distill",
                                   args.scale, tuple(codec.latent_shape), device)
    samplers = build_samplers(p.sample, p.base.sigma_data, teacher, student)
    fid: dict[str, list[float]] = {}
    for m in METHODS:
        fid[m] = []
        for k in args.seed_sets:
            images = generate(samplers[m], codec, seeds_of(k, args.num_samples), codec.latent_shape,
                              sigma_data=p.base.sigma_data, batch_size=p.sample.batch_size, device=device)
            q = compute_quality(images, reference, features="clf", classifier_dir=run / "artifacts/classifier",
                                kid_subset_size=p.evaluate.kid_subset_size, cache_dir=run / ".cache/fidelity",
                                reference_name="eval", prc=False, isc=False, device=device)
            fid[m].append(q["fid_clf"])
    mean = {m: statistics.mean(v) for m, v in fid.items()}
    for m, v in fid.items():
        spread = f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        print(f"{args.scale} {m}: fid_clf {mean[m]:.2f}{spread} over seed sets {args.seed_sets} "
              f"({', '.join(f'{x:.2f}' for x in v)})")
    print(f"{args.scale} ratio to the teacher: 1-step {mean['scm1'] / mean['teacher']:.3f}, "
          f"2-step {mean['scm2'] / mean['teacher']:.3f}")


if __name__ == "__main__":
    raise SystemExit(cli(main))  # a missing run or model: one "error:" line, exit code 2
