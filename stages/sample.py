"""Sample stage (per scale): images from the teacher's ODE sampler and from sCM 1-step and 2-step.

Consumes ``data/latents`` (the codec), ``artifacts/<scale>/teacher`` and ``artifacts/<scale>/distill``. Produces
``artifacts/<scale>/samples/``: ``samples.safetensors`` (uint8 images ``<method>_s<k>`` and their per-image seeds
``seeds_s<k>`` for each seed set k, and for class-conditional models their labels ``labels_s<k>``), a grid PNG per
method, ``sampling.json`` (NFE, times t, number of classes, each sampler's guidance), ``resolved_params.json`` and
``provenance.json`` (git commit, seconds per method; outside the output's DVC hash). Image i of seed set k has seed
k·10⁶ + i (its label, if any, is drawn from that seed too), so every image can be regenerated alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from study import layout
from study.cli import add_params_args, cli, load_args
from study.codec import load_codec
from study.files import atomic_output_dir, check_paths, write_json, write_provenance
from study.images import save_grid
from study.layout import METHODS
from study.params import BaseParams, SampleParams, to_plain
from study.runtime import setup_torch
from scm.samplers import labels_from_seeds
from study.sampling import build_samplers, generate, load_models, seeds_of


def run(params: SampleParams, base: BaseParams, scale: str, latents_dir: Path, teacher_dir: Path,
        student_dir: Path, out_dir: Path, *, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Sample every seed set with every method, decode, and write ``out_dir`` whole; returns ``sampling.json``.

    ``params`` holds this scale's values (per-scale guidance: :meth:`study.params.Params.at`)."""
    start = time.perf_counter()
    codec = load_codec(latents_dir, device=device)
    shape = tuple(codec.latent_shape)
    teacher, student = load_models(teacher_dir, student_dir, scale, shape, device)
    samplers = build_samplers(params, base.sigma_data, teacher, student)
    tensors: dict[str, Tensor] = {}
    seconds = {m: 0.0 for m in METHODS}
    for k in range(params.seed_sets):
        seeds = seeds_of(k, params.num_samples)
        tensors[f"seeds_s{k}"] = torch.tensor(seeds, dtype=torch.int64)
        if samplers["teacher"].num_classes:
            tensors[f"labels_s{k}"] = labels_from_seeds(seeds, samplers["teacher"].num_classes)
        for m in METHODS:
            t0 = time.perf_counter()
            tensors[f"{m}_s{k}"] = generate(samplers[m], codec, seeds, shape, sigma_data=base.sigma_data,
                                            batch_size=params.batch_size, device=device, progress=progress)
            seconds[m] += time.perf_counter() - t0
    info = {"scale": scale, "num_samples": params.num_samples, "seed_sets": params.seed_sets,
            "nfe": {m: samplers[m].nfe for m in METHODS}, "ts": {m: samplers[m].ts for m in METHODS},
            "num_classes": samplers["teacher"].num_classes, "guidance": {m: samplers[m].guidance for m in METHODS}}
    seconds |= {"wall": time.perf_counter() - start}
    with atomic_output_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / layout.SAMPLES_FILE))
        n = min(params.grid_size, params.num_samples)
        columns = max(1, int(n**0.5))
        for m in METHODS:
            save_grid(tmp / layout.grid_file(m), tensors[f"{m}_s0"][: n // columns * columns], columns)
        write_json(tmp / "sampling.json", info)
        write_provenance(tmp, {"base": to_plain(base), "sample": to_plain(params), "scale": scale,
                               "device": device}, seconds=seconds)
    return {**info, "wall_seconds": round(seconds["wall"], 2)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    parser.add_argument("--scale", required=True)
    parser.add_argument("--latents", type=Path, default=Path("data/latents"))
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = load_args(args).at(args.scale)  # per-scale values (sample.teacher_guidance: {S: 1.4, M: 1.2}) for this scale
    check_paths(inputs={"--latents": args.latents, "--teacher": args.teacher, "--student": args.student},
                outputs={"--out": args.out})
    device = setup_torch(p.base)
    info = run(p.sample, p.base, args.scale, args.latents, args.teacher, args.student, args.out, device=device)
    print(f"sample-{args.scale}: {info['seed_sets']} x {info['num_samples']} images per method, NFE {info['nfe']}, "
          f"{info['wall_seconds']:.0f} s -> {args.out}")
    return info


if __name__ == "__main__":
    raise SystemExit(cli(main))
