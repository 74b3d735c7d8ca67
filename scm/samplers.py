"""Samplers in TrigFlow: the teacher's PF-ODE solvers and sCM's 1-step, 2-step and multistep samplers.

Every sampler has one signature, ``sample_<name>(fn, noise, *, ts, ...)``: ``noise`` is a list of tensors drawn with
:func:`noise_from_seeds` (std σ_d), ``ts`` a decreasing list of TrigFlow times. The teacher samplers take a velocity
function (x_t, t) -> σ_d F (:func:`scm.trigflow.velocity`); the consistency sampler takes one too, since
f_θ(x_t, t) = cos t·x_t − sin t·σ_d F_θ is a function of the same velocity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from scm.constants import SIGMA_MAX, T_MID
from scm.trigflow import VelocityFn, append_dims, check_sigma_data, consistency_fn, ddim_step, t_max


def noise_from_seeds(seeds: Sequence[int], shape: Sequence[int], n: int, *, sigma_data: float,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[Tensor]:
    """``n`` noise tensors (N, *shape) with std σ_d; sample i's noise depends only on ``seeds[i]`` (EDM2 style).

    So the same seed gives the same image whatever the batch size or the batch's other seeds.
    """
    check_sigma_data(sigma_data)
    per_sample = []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        per_sample.append(torch.randn((n, *shape), generator=g, dtype=torch.float64))
    stacked = torch.stack(per_sample, dim=1)  # (n, N, *shape)
    return [(sigma_data * stacked[i]).to(device=device, dtype=dtype) for i in range(n)]


LABEL_SEED_OFFSET = 2**40  # a label's generator is seeded seed + 2⁴⁰: no image's noise generator has that seed


def labels_from_seeds(seeds: Sequence[int], num_classes: int, *, device: torch.device | str = "cpu") -> Tensor:
    """Class labels uniform on 0 … num_classes−1; label i depends only on ``seeds[i]`` (like its noise, whose
    generator it does not share), so a conditional image too can be regenerated alone."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    labels = [torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(seed) + LABEL_SEED_OFFSET))
              for seed in seeds]
    return torch.cat(labels).to(device) if labels else torch.empty(0, dtype=torch.long, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Time schedules.


def karras_times(n_steps: int, sigma_data: float, sigma_min: float = 0.002, sigma_max: float = SIGMA_MAX,
                 rho: float = 7.0) -> list[float]:
    """EDM's ρ-schedule of noise levels (Karras et al. 2022, Eq. 5) mapped to TrigFlow times, ending at t = 0."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    check_sigma_data(sigma_data)
    i = torch.arange(n_steps, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + i / max(n_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [math.atan(s / sigma_data) for s in sigmas.tolist()] + [0.0]


def consistency_times(n_steps: int, sigma_data: float, t_mid: float = T_MID) -> list[float]:
    """sCM sampling times: [t_max] for 1 step, [t_max, t_mid] for 2 (paper §5.2), else t_max then evenly down to t_mid/… ."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    first = t_max(sigma_data)
    if n_steps == 1:
        return [first]
    if not 0 < t_mid < first:
        raise ValueError(f"t_mid must lie in (0, t_max={first:.4f}), got {t_mid}")
    return [first] + torch.linspace(t_mid, 0, n_steps, dtype=torch.float64)[:-1].tolist()


def _check_ts(ts: Sequence[float]) -> None:
    if len(ts) < 1 or any(not 0 <= t <= math.pi / 2 for t in ts):
        raise ValueError(f"ts must be a non-empty list of times in [0, pi/2], got {list(ts)}")
    if any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts must be strictly decreasing, got {list(ts)}")


def _full(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Teacher: PF-ODE solvers (dx_t/dt = σ_d F, paper Eq. 3), starting from x_{ts[0]} = z.


@torch.no_grad()
def sample_euler(velocity_fn: VelocityFn, noise: Sequence[Tensor], *, ts: Sequence[float]) -> Tensor:
    """TrigFlow DDIM (paper Eq. 26): x_t = cos(s−t)·x_s − sin(s−t)·σ_d F(x_s/σ_d, s). NFE = len(ts) − 1."""
    _check_ts(ts)
    x = noise[0]
    for s, t in zip(ts[:-1], ts[1:]):
        x = ddim_step(x, _full(x, s), _full(x, t), velocity_fn(x, _full(x, s)))
    return x


@torch.no_grad()
def sample_dpm2(velocity_fn: VelocityFn, noise: Sequence[Tensor], *, ts: Sequence[float]) -> Tensor:
    """Second-order single-step solver (DPM-Solver-2 in data prediction, paper Eqs. 27-28 in spirit).

    DDIM is the exponential integrator x_t = (sin t/sin s)·x_s + (sin(s−t)/sin s)·D with D = x̂0 held constant;
    evaluating D at the midpoint r = (s+t)/2 makes it second order. The last step (to t = 0) is a DDIM step,
    so NFE = 2·(len(ts) − 1) − 1, as EDM's Heun (e.g. 18 steps = NFE 35, the paper's CIFAR-10 teacher).
    """
    _check_ts(ts)
    x = noise[0]
    steps = list(zip(ts[:-1], ts[1:]))
    for i, (s, t) in enumerate(steps):
        v_s = velocity_fn(x, _full(x, s))
        if i == len(steps) - 1 and t == 0.0:
            x = ddim_step(x, _full(x, s), _full(x, t), v_s)
            continue
        r = 0.5 * (s + t)
        x_r = ddim_step(x, _full(x, s), _full(x, r), v_s)
        D_r = consistency_fn(x_r, _full(x, r), velocity_fn(x_r, _full(x, r)))  # x̂0 at the midpoint
        x = (math.sin(t) / math.sin(s)) * x + (math.sin(s - t) / math.sin(s)) * D_r
    return x


TEACHER_SAMPLERS = {"euler": sample_euler, "dpm2": sample_dpm2}


def teacher_nfe(sampler: str, n_steps: int) -> int:
    """Network evaluations of a teacher sampler with ``n_steps`` steps of :func:`karras_times`."""
    if sampler not in TEACHER_SAMPLERS:
        raise ValueError(f"unknown teacher sampler {sampler!r} (accepted: {', '.join(TEACHER_SAMPLERS)})")
    return n_steps if sampler == "euler" else 2 * n_steps - 1


# ---------------------------------------------------------------------------------------------------------------
# sCM: the consistency sampler.


@torch.no_grad()
def sample_consistency(velocity_fn: VelocityFn, noise: Sequence[Tensor], *, ts: Sequence[float]) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; sCM v2 §5.2).

    x̂0 = f_θ(z, ts[0]); then for each later t: x_t = cos t·x̂0 + sin t·z', x̂0 = f_θ(x_t, t), with fresh noise z'.
    ``ts = [t_max]`` is 1-step, ``[t_max, 1.1]`` the paper's 2-step. Needs ``len(noise) >= len(ts)``.
    """
    _check_ts(ts)
    if len(noise) < len(ts):
        raise ValueError(f"sample_consistency needs {len(ts)} noise tensors for {len(ts)} steps, got {len(noise)}")
    x = noise[0]
    x0 = consistency_fn(x, _full(x, ts[0]), velocity_fn(x, _full(x, ts[0])))
    for i, t in enumerate(ts[1:], start=1):
        tt = append_dims(_full(x0, t), x0.ndim)
        x = torch.cos(tt) * x0 + torch.sin(tt) * noise[i]
        x0 = consistency_fn(x, _full(x, t), velocity_fn(x, _full(x, t)))
    return x0
