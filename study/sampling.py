"""The three samplers the study compares, and per-seed image generation.

Teacher ODE at its NFE, sCM 1-step and sCM 2-step, each a :class:`Sampler` over the velocity of a loaded network.
Image i of seed set k has seed k·10⁶ + i (:func:`seeds_of`), and each image depends only on its own seed, so every
image can be regenerated alone. With the identity codec the batch size never changes a result; through a VAE it can
move a decoded pixel by one gray level (the CPU kernels' float sums depend on the batch), so regenerate in the sample
stage's batches (``sample.batch_size`` from the start of a seed set) for bit-identical images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from study.progress import bar as progress_bar

from scm import samplers
from scm.trigflow import velocity
from study.codec import Codec
from study.errors import StageError
from study.models import load_model
from study.params import SampleParams



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


def build_samplers(params: SampleParams, sigma_data: float, teacher: torch.nn.Module,
                   student: torch.nn.Module) -> dict[str, Sampler]:
    """The three samplers compared everywhere: teacher ODE at its default NFE, sCM 1-step, sCM 2-step."""
    v_teacher = lambda x, t: velocity(teacher, x, t, sigma_data)
    v_student = lambda x, t: velocity(student, x, t, sigma_data)
    ts_teacher = samplers.karras_times(params.teacher_steps, sigma_data)
    return {
        "teacher": Sampler("teacher", samplers.TEACHER_SAMPLERS[params.teacher_sampler], v_teacher, ts_teacher,
                           samplers.teacher_nfe(params.teacher_sampler, params.teacher_steps), 1),
        "scm1": Sampler("scm1", samplers.sample_consistency, v_student, samplers.consistency_times(1, sigma_data), 1, 1),
        "scm2": Sampler("scm2", samplers.sample_consistency, v_student, samplers.consistency_times(2, sigma_data, params.t_mid), 2, 2),
    }


def seeds_of(seed_set: int, n: int) -> list[int]:
    """The seeds of the first ``n`` images of seed set ``seed_set``."""
    return [seed_set * SEED_STRIDE + i for i in range(n)]


def generate(sampler: Sampler, codec: Codec, seeds: Sequence[int], shape: Sequence[int], *, sigma_data: float,
             batch_size: int, device: str, progress: bool = False) -> Tensor:
    """Decoded uint8 images for ``seeds`` (each image depends only on its own seed)."""
    out = []
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in progress_bar(chunks, desc=f"sample {sampler.name}", unit="batch", disable=not progress, leave=False):
        noise = samplers.noise_from_seeds(chunk, shape, sampler.n_noise, sigma_data=sigma_data, device=device)
        latents = sampler(noise)
        if not torch.isfinite(latents).all():
            raise StageError(f"sampler {sampler.name}: NaN or inf latents for seeds {chunk[0]}..{chunk[-1]} "
                             "(a diverged model?); no images written")
        out.append(codec.decode(latents).cpu())
    return torch.cat(out)


def load_models(teacher_dir: Path, student_dir: Path, scale: str, shape: tuple[int, ...],
                device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The teacher's and the student's EMA networks, checked against the scale and the latent shape."""
    teacher, _ = load_model(teacher_dir, expect_shape=shape, expect_scale=scale, device=device)
    student, _ = load_model(student_dir, expect_shape=shape, expect_scale=scale, device=device)
    return teacher, student

