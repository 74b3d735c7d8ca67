"""Sample stage (per scale): images from the teacher's ODE sampler and from sCM 1-step and 2-step.

Consumes ``data/latents`` (the codec), ``artifacts/<scale>/teacher`` and ``artifacts/<scale>/distill``. Produces
``artifacts/<scale>/samples/``: ``samples.safetensors`` (uint8 images ``<method>_s<k>`` and their per-image seeds
``seeds_s<k>`` for each seed set k), a grid PNG per method, ``sampling.json`` (times, NFE) and
``resolved_params.json``. Image i of seed set k has seed k·10⁶ + i, so every image can be regenerated alone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from scm import samplers as S
from scm.trigflow import velocity
from stages import config
from stages.common import atomic_output_dir, cli, setup_torch, write_json, write_provenance
from stages.encode import Codec, load_codec, save_grid
from stages.training import load_model

METHODS = ("teacher", "scm1", "scm2")
SEED_STRIDE = 1_000_000


@dataclass
class Sampler:
    """One way of turning per-sample noise into latents: a sampler function, its times and its NFE."""

    name: str
    fn: Callable[..., Tensor]
    velocity_fn: Callable[[Tensor, Tensor], Tensor]
    ts: list[float]
    nfe: int
    n_noise: int

    def __call__(self, noise: Sequence[Tensor]) -> Tensor:
        return self.fn(self.velocity_fn, noise, ts=self.ts)


def build_samplers(params: config.SampleParams, sigma_data: float, teacher: torch.nn.Module,
                   student: torch.nn.Module) -> dict[str, Sampler]:
    """The three samplers compared everywhere: teacher ODE at its default NFE, sCM 1-step, sCM 2-step."""
    v_teacher = lambda x, t: velocity(teacher, x, t, sigma_data)
    v_student = lambda x, t: velocity(student, x, t, sigma_data)
    ts_teacher = S.karras_times(params.teacher_steps, sigma_data)
    return {
        "teacher": Sampler("teacher", S.TEACHER_SAMPLERS[params.teacher_sampler], v_teacher, ts_teacher,
                           S.teacher_nfe(params.teacher_sampler, params.teacher_steps), 1),
        "scm1": Sampler("scm1", S.sample_consistency, v_student, S.consistency_times(1, sigma_data), 1, 1),
        "scm2": Sampler("scm2", S.sample_consistency, v_student, S.consistency_times(2, sigma_data, params.t_mid), 2, 2),
    }


def seeds_of(seed_set: int, n: int) -> list[int]:
    return [seed_set * SEED_STRIDE + i for i in range(n)]


def generate(sampler: Sampler, codec: Codec, seeds: Sequence[int], shape: Sequence[int], *, sigma_data: float,
             batch_size: int, device: str, progress: bool = False) -> Tensor:
    """Decoded uint8 images for ``seeds`` (each image depends only on its own seed)."""
    out = []
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in tqdm(chunks, desc=f"sample {sampler.name}", disable=not progress, leave=False):
        noise = S.noise_from_seeds(chunk, shape, sampler.n_noise, sigma_data=sigma_data, device=device)
        out.append(codec.decode(sampler(noise)).cpu())
    return torch.cat(out)


def load_models(teacher_dir: Path, student_dir: Path, scale: str, shape: tuple[int, ...], device: str):
    teacher, _ = load_model(teacher_dir, expect_shape=shape, expect_scale=scale, device=device)
    student, _ = load_model(student_dir, expect_shape=shape, expect_scale=scale, device=device)
    return teacher, student


def run(params: config.SampleParams, base: config.BaseParams, scale: str, latents_dir: Path, teacher_dir: Path,
        student_dir: Path, out_dir: Path, *, device: str = "cpu", progress: bool = True) -> dict[str, Any]:
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
        for m in METHODS:
            t0 = time.perf_counter()
            tensors[f"{m}_s{k}"] = generate(samplers[m], codec, seeds, shape, sigma_data=base.sigma_data,
                                            batch_size=params.batch_size, device=device, progress=progress)
            seconds[m] += time.perf_counter() - t0
    info = {"scale": scale, "num_samples": params.num_samples, "seed_sets": params.seed_sets,
            "nfe": {m: samplers[m].nfe for m in METHODS}, "ts": {m: samplers[m].ts for m in METHODS},
            "generate_seconds": {m: round(s, 3) for m, s in seconds.items()},
            "wall_seconds": round(time.perf_counter() - start, 2)}
    with atomic_output_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "samples.safetensors"))
        n = min(params.grid_size, params.num_samples)
        columns = max(1, int(n**0.5))
        for m in METHODS:
            save_grid(tmp / f"grid_{m}.png", tensors[f"{m}_s0"][: n // columns * columns], columns)
        write_json(tmp / "sampling.json", info)
        write_provenance(tmp, {"base": config.to_plain(base), "sample": config.to_plain(params), "scale": scale,
                               "device": device})
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_params_args(parser)
    parser.add_argument("--scale", required=True)
    parser.add_argument("--latents", type=Path, default=Path("data/latents"))
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--student", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    p = config.load_args(args)
    device = setup_torch(p.base)
    info = run(p.sample, p.base, args.scale, args.latents, args.teacher, args.student, args.out, device=device)
    print(f"sample-{args.scale}: {info['seed_sets']} x {info['num_samples']} images per method, NFE {info['nfe']}, "
          f"{info['wall_seconds']:.0f} s -> {args.out}")
    return info


if __name__ == "__main__":
    raise SystemExit(cli(main))
