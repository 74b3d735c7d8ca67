"""TrigFlow: the diffusion parameterisation that sCM lives in (sCM v2 §3, App. B).

Clocks. TrigFlow time ``t`` in [0, π/2] (0 is data, π/2 pure noise) and the EDM noise level ``sigma`` never share a
variable; they meet only in :func:`sigma_to_t` / :func:`t_to_sigma`.

Networks. A network ``net(x_hat, t, class_labels=None)`` computes F_θ(x_t/σ_d, c_noise(t)) with c_noise(t) = t
(paper §4.1). Everything here works on any tensor shape (N, ...): pixels, latents or 2-D points.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from scm.constants import SIGMA_MAX

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> dx_t/dt = σ_d·F(x_t/σ_d, t)


# ---------------------------------------------------------------------------------------------------------------
# Input checks (the library raises ValueError with the argument's name; stages turn them into one-line errors).


def check_sigma_data(sigma_data: float) -> None:
    if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")






def check_finite(x: Tensor, name: str = "x0") -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


# ---------------------------------------------------------------------------------------------------------------
# Clocks.


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a per-sample (N,) tensor to (N, 1, ..., 1) with ``ndim`` dims, for broadcasting against x."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def sigma_to_t(sigma: Tensor | float, sigma_data: float) -> Tensor:
    """EDM noise level -> TrigFlow time: t = arctan(σ/σ_d) (paper App. B, Eq. 30)."""
    return torch.atan(torch.as_tensor(sigma, dtype=torch.float64 if isinstance(sigma, float) else None) / sigma_data)


def t_to_sigma(t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow time -> EDM noise level: σ = σ_d·tan t."""
    return sigma_data * torch.tan(t)


def t_max(sigma_data: float, sigma_max: float = SIGMA_MAX) -> float:
    """The 1-step sampler's starting time, t_max = arctan(σ_max/σ_d) (paper App. G.2); ≈ 1.5645 at σ_d = 0.5."""
    check_sigma_data(sigma_data)
    return math.atan(sigma_max / sigma_data)


# ---------------------------------------------------------------------------------------------------------------
# Forward process, velocity, consistency function.




def t_from_normal(u: Tensor, P_mean: float, P_std: float, sigma_data: float) -> Tensor:
    """The proposal's t from a standard normal u: τ = P_mean + P_std·u, t = arctan(e^τ/σ_d) (paper Alg. 1)."""
    tau = P_mean + P_std * u
    return torch.atan(torch.exp(tau) / sigma_data)


def add_noise(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """TrigFlow interpolation x_t = cos t·x0 + sin t·z, with z ~ N(0, σ_d² I) (paper §3)."""
    t = append_dims(t, x0.ndim)
    return torch.cos(t) * x0 + torch.sin(t) * z


def velocity_target(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """The conditional velocity v_t = dx_t/dt = cos t·z − sin t·x0 (paper Eq. 4; sCT's dx_t/dt in Alg. 1)."""
    t = append_dims(t, x0.ndim)
    return torch.cos(t) * z - torch.sin(t) * x0


def velocity(net: Callable[..., Tensor], x_t: Tensor, t: Tensor, sigma_data: float, class_labels: Tensor | None = None) -> Tensor:
    """The PF-ODE velocity dx_t/dt = σ_d·F_θ(x_t/σ_d, t) (paper Eq. 3)."""
    return sigma_data * net(x_t / sigma_data, t, class_labels)


def guided_velocity(v_cond: Tensor, v_uncond: Tensor, s: Tensor | float) -> Tensor:
    """Classifier-free guidance of the PF-ODE velocity: v_u + s·(v_c − v_u), s per sample (s = 1: the conditional
    velocity). sCD distils the guided teacher's ODE with s ~ U[1, s_max] (paper App. G, ImageNet 512)."""
    s = append_dims(torch.as_tensor(s, dtype=v_cond.dtype, device=v_cond.device).expand(v_cond.shape[0]), v_cond.ndim)
    return v_uncond + s * (v_cond - v_uncond)


def guided_teacher_velocity(net: Callable[..., Tensor], x_t: Tensor, t: Tensor, sigma_data: float,
                            class_labels: Tensor, s: Tensor | float) -> Tensor:
    """A class-conditional network's guided velocity: :func:`guided_velocity` of its conditional velocity and its
    velocity at the null label (``class_labels=None``), two calls; at s = 1 the conditional velocity alone."""
    v_cond = velocity(net, x_t, t, sigma_data, class_labels)
    if not isinstance(s, Tensor) and s == 1.0:
        return v_cond
    return guided_velocity(v_cond, velocity(net, x_t, t, sigma_data, None), s)


def consistency_fn(x_t: Tensor, t: Tensor, sigma_data_F: Tensor) -> Tensor:
    """The consistency function f_θ(x_t, t) = cos t·x_t − sin t·σ_d F_θ (paper Eq. 5); f_θ(x, 0) = x exactly.

    ``sigma_data_F`` is σ_d·F_θ(x_t/σ_d, t), i.e. :func:`velocity`.
    """
    t = append_dims(t, x_t.ndim)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_data_F


def ddim_step(x_s: Tensor, s: Tensor, t: Tensor, sigma_data_F: Tensor) -> Tensor:
    """One TrigFlow DDIM step from s to t (paper Eq. 26): x_t = cos(s−t)·x_s − sin(s−t)·σ_d F(x_s/σ_d, s)."""
    d = append_dims(s - t, x_s.ndim)
    return torch.cos(d) * x_s - torch.sin(d) * sigma_data_F


# ---------------------------------------------------------------------------------------------------------------
# Teachers that were not trained in TrigFlow (paper App. B.2, Eqs. 29-30). Each returns a VelocityFn.


def edm_teacher(denoiser: Callable[[Tensor, Tensor], Tensor], sigma_data: float) -> VelocityFn:
    """An EDM denoiser D(x_σ; σ) ≈ E[x0 | x0 + σε = x_σ] as a TrigFlow velocity (paper Eq. 30).

    σ = σ_d·tan t, x_σ = x_t/cos t, and σ_d F = [cos t·x_t − D(x_σ; σ)]/sin t.
    """
    check_sigma_data(sigma_data)

    def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
        sigma = t_to_sigma(t, sigma_data)
        c = append_dims(torch.cos(t), x_t.ndim)
        s = append_dims(torch.sin(t), x_t.ndim)
        x0_hat = denoiser(x_t / c, sigma)
        return (c * x_t - x0_hat) / s

    return velocity_fn


def rectified_flow_teacher(model: Callable[[Tensor, Tensor], Tensor], sigma_data: float, time_scale: float = 1.0) -> VelocityFn:
    """A rectified-flow velocity model v(x_s, s) ≈ ε − y0 on x_s = (1−s)·y0 + s·ε, y0 = x0/σ_d (paper App. B.2).

    s = sin t/(sin t + cos t), x_s = (x_t/σ_d)/(sin t + cos t), and
    F = [(1 − 2s)·x_s + (1 − 2s + 2s²)·v]/√(s² + (1−s)²). ``time_scale`` = 1000 for models that expect s·1000.
    """
    check_sigma_data(sigma_data)

    def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
        s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
        x_s = (x_t / sigma_data) / append_dims(torch.sin(t) + torch.cos(t), x_t.ndim)
        v = model(x_s, s * time_scale)
        s_ = append_dims(s, x_t.ndim)
        F = ((1 - 2 * s_) * x_s + (1 - 2 * s_ + 2 * s_**2) * v) / torch.sqrt(s_**2 + (1 - s_) ** 2)
        return sigma_data * F

    return velocity_fn


def alpha_sigma_teacher(model: Callable[[Tensor, Tensor], Tensor], sigma_data: float, *, prediction: str,
                        alpha: Callable[[Tensor], Tensor], sigma: Callable[[Tensor], Tensor],
                        time_from_ratio: Callable[[Tensor], Tensor], data_scale: float = 1.0) -> VelocityFn:
    """A general x' = α(s)·x0' + σ(s)·ε model (ε-, v- or x0-prediction) as a TrigFlow velocity (paper Eq. 29).

    The teacher's data x0' = ``data_scale``·x0 (e.g. 1 for [−1, 1] pixels standardised to σ_d = 0.5, or a VAE's
    scaling factor over σ_d). ``time_from_ratio(ρ)`` returns the teacher time s with σ(s)/α(s) = ρ (a discrete
    schedule's fractional timestep: :class:`scm.schedules.DiscreteSchedule`). The TrigFlow query (x_t, t) maps to
    ρ = data_scale·σ_d·tan t and x' = α·data_scale·x_t/cos t; the teacher's x̂0' gives x̂0 = x̂0'/data_scale and
    σ_d F = (cos t·x_t − x̂0)/sin t. ε-prediction: x̂0' = (x' − σ ε̂)/α. v-prediction (v = α ε − σ x0'):
    x̂0' = (α x' − σ v̂)/(α² + σ²). x0-prediction: the output is x̂0'.
    """
    check_sigma_data(sigma_data)
    if prediction not in ("eps", "v", "x0"):
        raise ValueError(f"prediction must be one of 'eps', 'v', 'x0', got {prediction!r}")
    if not (math.isfinite(data_scale) and data_scale > 0):
        raise ValueError(f"data_scale must be a finite number > 0, got {data_scale!r}")

    def velocity_fn(x_t: Tensor, t: Tensor) -> Tensor:
        s = time_from_ratio(data_scale * sigma_data * torch.tan(t))
        a = append_dims(alpha(s), x_t.ndim)
        b = append_dims(sigma(s), x_t.ndim)
        c = append_dims(torch.cos(t), x_t.ndim)
        x_prime = a * data_scale * x_t / c
        out = model(x_prime, s)
        if prediction == "eps":
            x0_hat = (x_prime - b * out) / a
        elif prediction == "v":
            x0_hat = (a * x_prime - b * out) / (a**2 + b**2)
        else:
            x0_hat = out
        return (c * x_t - x0_hat / data_scale) / append_dims(torch.sin(t), x_t.ndim)

    return velocity_fn
