"""The three samplers the study compares, and per-seed image generation.

Teacher ODE at its NFE, sCM 1-step and sCM 2-step, each a :class:`Sampler` over the velocity of a loaded network.
Image i of seed set k has seed k·10⁶ + i (:func:`seeds_of`), and each image depends only on its own seed, so every
image can be regenerated alone; for class-conditional models its label too is drawn from its seed (uniform over the
classes, :func:`scm.samplers.labels_from_seeds`), and each sampler has its own guidance scale (``sample.*guidance*``):
the teacher by classifier-free guidance (two network calls per NFE), a guided sCD student through its guidance input. With the identity codec the batch size never changes a result; through a VAE it can
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

from scm import networks, samplers
from scm.trigflow import guided_teacher_velocity, velocity
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
    velocity_fn: Callable[..., Tensor]  # (x_t, t[, class_labels]) -> dx_t/dt
    ts: list[float]
    nfe: int
    n_noise: int
    num_classes: int = 0  # > 0: class-conditional; __call__ takes the labels
    guidance: float = 1.0

    def __call__(self, noise: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        v = self.velocity_fn if labels is None else (lambda x, t: self.velocity_fn(x, t, labels))
        return self.fn(v, noise, ts=self.ts)


def teacher_velocity(net: torch.nn.Module, sigma_data: float, guidance: float) -> Callable[..., Tensor]:
    """dx_t/dt of the teacher: unconditional, or conditional on the labels with classifier-free guidance."""
    def v(x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            return velocity(net, x, t, sigma_data)
        return guided_teacher_velocity(net, x, t, sigma_data, labels, guidance)
    return v


def student_velocity(net: torch.nn.Module, sigma_data: float, guidance: float, key: str) -> Callable[..., Tensor]:
    """dx_t/dt of the student σ_d·F_θ(x_t/σ_d, t[, labels][, s]); s goes to a student that has a guidance input."""
    guided = networks.has_guidance_embedding(net)
    if not guided and guidance != 1:
        raise StageError(f"sample.{key}: the student has no guidance input (distilled with distill.guidance_max = 1); "
                         f"set it to 1, got {guidance!r}")

    def v(x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        if not guided:
            return velocity(net, x, t, sigma_data, labels)
        s = torch.full((x.shape[0],), guidance, dtype=x.dtype, device=x.device)
        return sigma_data * net(x / sigma_data, t, labels, guidance=s)
    return v


def build_samplers(params: SampleParams, sigma_data: float, teacher: torch.nn.Module,
                   student: torch.nn.Module) -> dict[str, Sampler]:
    """The three samplers compared everywhere: teacher ODE at its default NFE, sCM 1-step, sCM 2-step.

    ``params`` holds one scale's values (:meth:`study.params.Params.at`)."""
    k = networks.num_classes(teacher)
    if networks.num_classes(student) != k:
        raise StageError(f"the student has {networks.num_classes(student)} classes, its teacher {k}")
    ts_teacher = samplers.karras_times(params.teacher_steps, sigma_data)
    v_teacher = teacher_velocity(teacher, sigma_data, params.teacher_guidance)
    v_scm1 = student_velocity(student, sigma_data, params.guidance_1step, "guidance_1step")
    v_scm2 = student_velocity(student, sigma_data, params.guidance_2step, "guidance_2step")
    return {
        "teacher": Sampler("teacher", samplers.TEACHER_SAMPLERS[params.teacher_sampler], v_teacher, ts_teacher,
                           samplers.teacher_nfe(params.teacher_sampler, params.teacher_steps), 1, k,
                           params.teacher_guidance),
        "scm1": Sampler("scm1", samplers.sample_consistency, v_scm1, samplers.consistency_times(1, sigma_data), 1, 1, k,
                        params.guidance_1step),
        "scm2": Sampler("scm2", samplers.sample_consistency, v_scm2,
                        samplers.consistency_times(2, sigma_data, params.t_mid), 2, 2, k, params.guidance_2step),
    }


def seeds_of(seed_set: int, n: int) -> list[int]:
    """The seeds of the first ``n`` images of seed set ``seed_set``."""
    return [seed_set * SEED_STRIDE + i for i in range(n)]


def generate(sampler: Sampler, codec: Codec, seeds: Sequence[int], shape: Sequence[int], *, sigma_data: float,
             batch_size: int, device: str, progress: bool = False) -> Tensor:
    """Decoded uint8 images for ``seeds`` (each image depends only on its own seed, its label too if conditional)."""
    out = []
    chunks = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk in progress_bar(chunks, desc=f"sample {sampler.name}", unit="batch", disable=not progress, leave=False):
        noise = samplers.noise_from_seeds(chunk, shape, sampler.n_noise, sigma_data=sigma_data, device=device)
        labels = samplers.labels_from_seeds(chunk, sampler.num_classes, device=device) if sampler.num_classes else None
        latents = sampler(noise, labels)
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

