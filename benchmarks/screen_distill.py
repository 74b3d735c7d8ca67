"""Screen distill settings on a finished run: fine-tune its teacher once, score the student's EMA every few steps.

The distill stage's own code path (:func:`stages.distill.run`'s objective, optimiser and training loop) with the
given ``-S distill.<key>=<value>`` overrides, run for ``--steps`` steps; every ``--every`` steps the EMA weights are
scored, 1-step and 2-step, in both classifiers' feature spaces (``fid_clf``, ``fid_clf2``) on seed sets the
pipeline never samples (default 10, 11, 12), against the eval split, as the evaluate stage scores. The teacher is
scored once on the same sets. The learning rate is constant, so the snapshot at step k of a longer run is the k-step
run's student. One JSON line per snapshot goes to ``--out``; a table is printed at the end.

    python benchmarks/screen_distill.py --run <project after dvc repro> --scale cpu-s -S distill.method=scd \\
        --steps 1500 --every 250 --out screen.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from stages.distill import distill_spec, student_from_teacher
from study import params as study_params
from study.checkpoint import Checkpointer
from study.cli import cli
from study.codec import load_codec
from study.fidelity import classifier_space, compute_quality
from study.images import load_split
from study.latents import load_latents
from study.models import load_model
from study.runtime import setup_torch
from study.sampling import build_samplers, generate, seeds_of
from study.training import train


class Snapshots(Checkpointer):
    """A checkpointer that keeps the EMA weights of every save in memory and writes nothing."""

    def __init__(self, every: int):
        super().__init__(Path("/nonexistent-screen"), every, "screen")
        self.ema: dict[int, dict[str, torch.Tensor]] = {}

    def restore(self, expected=None):
        return None

    def save(self, state_fn):
        state = state_fn()
        self.ema[state["step"]] = {k: v.detach().clone() for k, v in state["ema"].items()}
        return Path("memory")


def score(sampler, codec, reference, spaces, seed_sets, p, cache, device) -> dict[str, list[float]]:
    fids: dict[str, list[float]] = {space.name: [] for space in spaces}
    for k in seed_sets:
        images = generate(sampler, codec, seeds_of(k, p.sample.num_samples), codec.latent_shape,
                          sigma_data=p.base.sigma_data, batch_size=p.sample.batch_size, device=device)
        for space in spaces:
            q = compute_quality(images, reference, space, kid_subset_size=p.evaluate.kid_subset_size, cache_dir=cache,
                                reference_name="eval", prc=False, isc=False, device=device)
            fids[space.name].append(q[f"fid_{space.name}"])
    return fids


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a project directory after `dvc repro`")
    parser.add_argument("--scale", required=True)
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, e.g. distill.method=scd (repeatable)")
    parser.add_argument("--every", type=int, default=250, help="score the EMA every this many steps")
    parser.add_argument("--seed-sets", type=int, nargs="+", default=[10, 11, 12])
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    args = parser.parse_args(argv)

    run = args.run
    p = study_params.load(run / "params.yaml", overrides=args.set)
    device = setup_torch(p.base)
    codec = load_codec(run / "data/latents", device=device)
    reference, _ = load_split(run / "data/prepared", "eval")
    data = load_latents(run / "data/latents")
    teacher, _ = load_model(run / f"artifacts/{args.scale}/teacher", expect_shape=data.shape, expect_scale=args.scale,
                            device=device)
    spaces = [classifier_space(run / "artifacts/classifier"), classifier_space(run / "artifacts/classifier", second=True)]
    cache = run / ".cache/fidelity"
    label = " ".join(args.set) or "default"
    rows = []

    # The teacher once, on the same sets.
    samplers = build_samplers(p.sample, p.base.sigma_data, teacher, teacher)
    teacher_fid = score(samplers["teacher"], codec, reference, spaces, args.seed_sets, p, cache, device)

    # The distill stage's objective and optimiser (stages/distill.py), snapshots of the EMA every --every steps.
    d = p.distill
    student = student_from_teacher(teacher, d.dropout, p.base.seed)
    spec = distill_spec(d, p.base.sigma_data, args.scale, p.base.seed, teacher, student)
    snaps = Snapshots(args.every)
    start = time.perf_counter()
    result = train(student, spec, data.train, checkpoint=snaps, progress=True)
    seconds = time.perf_counter() - start
    snaps.ema[d.steps] = result.ema.net.state_dict()

    net = copy.deepcopy(result.ema.net)
    for step, state in sorted(snaps.ema.items()):
        net.load_state_dict(state)
        samplers = build_samplers(p.sample, p.base.sigma_data, teacher, net)
        fid = {m: score(samplers[m], codec, reference, spaces, args.seed_sets, p, cache, device) for m in ("scm1", "scm2")}
        row = {"scale": args.scale, "settings": label, "step": step, "seed_sets": args.seed_sets,
               "train_seconds": round(seconds, 1), "teacher": teacher_fid, **fid}
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    print(f"{args.scale} [{label}]: ratio to the teacher, 1-step / 2-step, mean of seed sets {args.seed_sets}")
    for row in rows:
        cells = []
        for space in spaces:
            t = statistics.mean(row["teacher"][space.name])
            r1, r2 = (statistics.mean(row[m][space.name]) / t for m in ("scm1", "scm2"))
            cells.append(f"{space.name} {r1:.2f} / {r2:.2f}")
        print(f"  step {row['step']:>5}: " + "   ".join(cells))


if __name__ == "__main__":
    raise SystemExit(cli(main))
