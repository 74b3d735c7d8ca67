"""scm/schedules.py: discrete DDPM/DDIM schedules queried at fractional timesteps, and the exact Gaussian-mixture
teacher as ε-, v- and x0-prediction on them giving the exact TrigFlow velocity (rounding the timestep is caught)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from scm import trigflow
from scm.schedules import DiscreteSchedule
from scm.toy import GaussianMixture

SD = 0.5
GMM = GaussianMixture.ring()
SCHEDULES = [("linear", False), ("scaled_linear", False), ("squaredcos_cap_v2", False), ("linear", True)]


def _alphas_cumprod(beta_schedule: str, zero_snr: bool) -> torch.Tensor:
    """diffusers' own 1,000-step schedule (beta_start/end as DDPM and Stable Diffusion use them)."""
    ends = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}
    start, end = ends[beta_schedule]
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end,
                      rescale_betas_zero_snr=zero_snr)
    return s.alphas_cumprod.double()


@pytest.mark.parametrize("beta_schedule,zero_snr", SCHEDULES)
def test_integer_timesteps_are_the_schedule_and_fractional_ones_round_trip(beta_schedule, zero_snr):
    ac = _alphas_cumprod(beta_schedule, zero_snr)
    sched = DiscreteSchedule(ac)
    assert sched.tau_max == (998 if zero_snr else 999)
    i = torch.arange(int(sched.tau_max) + 1, dtype=torch.float64)
    assert torch.allclose(sched.alpha(i), ac[: i.numel()].sqrt(), rtol=1e-12)
    assert torch.allclose(sched.sigma(i), (1 - ac[: i.numel()]).sqrt(), rtol=1e-12)
    tau = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sched.tau_max
    rho = sched.sigma(tau) / sched.alpha(tau)
    assert torch.allclose(sched.timestep(rho), tau, atol=1e-8)
    assert (sched.alpha(tau) ** 2 + sched.sigma(tau) ** 2 - 1).abs().max() < 1e-12  # variance preserving


def test_the_range_is_clamped_and_reported():
    sched = DiscreteSchedule(_alphas_cumprod("linear", False))
    rho = torch.tensor([1e-4, 0.5, 80.0, 1e4], dtype=torch.float64)
    assert sched.in_range(rho).tolist() == [False, True, True, False]  # σ_max = 80 (sCM's t_max) is inside
    assert sched.timestep(rho)[[0, 3]].tolist() == [0.0, 999.0]
    with pytest.raises(ValueError, match="decrease strictly"):
        DiscreteSchedule(torch.tensor([0.5, 0.6, 0.1]))
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        DiscreteSchedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="only at its end"):
        DiscreteSchedule(torch.tensor([0.9, 0.0, 0.0]))


def _exact_model(sched: DiscreteSchedule, prediction: str, data_scale: float):
    """The exact denoiser of the mixture (data x0' = data_scale·x0), as a network on the discrete schedule would be
    if it had learnt every fractional timestep."""

    def model(x_prime, tau):
        a, b = sched.alpha(tau), sched.sigma(tau)
        # x'/data_scale = α·x0 + (σ/data_scale)·ε, so E[x0' | x'] = data_scale·E[x0 | x'/data_scale]
        x0 = data_scale * GMM.posterior_mean(x_prime / data_scale, a, b / data_scale)
        eps = (x_prime - a[:, None] * x0) / b[:, None]
        return {"eps": eps, "v": a[:, None] * eps - b[:, None] * x0, "x0": x0}[prediction]

    return model


def _query(sched, data_scale, n=256):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.05
    x_t = trigflow.add_noise(GMM.sample(n, g), SD * torch.randn(n, 2, generator=g, dtype=torch.float64), t)
    keep = sched.in_range(data_scale * SD * torch.tan(t))
    return x_t[keep], t[keep]


@pytest.mark.parametrize("beta_schedule,zero_snr", SCHEDULES)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("data_scale", [1.0, 2.0])
def test_exact_discrete_teachers_give_the_exact_trigflow_velocity(beta_schedule, zero_snr, prediction, data_scale):
    sched = DiscreteSchedule(_alphas_cumprod(beta_schedule, zero_snr))
    model = _exact_model(sched, prediction, data_scale)
    x_t, t = _query(sched, data_scale)
    assert len(t) > 200
    tau = sched.timestep(data_scale * SD * torch.tan(t))
    assert (tau != tau.round()).all()  # queried between timesteps
    v = trigflow.alpha_sigma_teacher(model, SD, prediction=prediction, alpha=sched.alpha, sigma=sched.sigma,
                                     time_from_ratio=sched.timestep, data_scale=data_scale)
    exact = GMM.trigflow_velocity(SD)(x_t, t)
    assert (v(x_t, t) - exact).abs().max() < 1e-8

    # Rounding to the nearest timestep (what an index lookup does) is off by far more than the tolerance.
    rounded = trigflow.alpha_sigma_teacher(model, SD, prediction=prediction, alpha=sched.alpha, sigma=sched.sigma,
                                           time_from_ratio=lambda rho: sched.timestep(rho).round(), data_scale=data_scale)
    assert (rounded(x_t, t) - exact).abs().max() > 1e-4


def test_the_time_derivative_reaches_the_network_only_without_rounding():
    """d/dt of the converted velocity (forward-mode AD, as sCM's tangent) against a float64 central difference."""
    sched = DiscreteSchedule(_alphas_cumprod("linear", False))
    seen = []

    def model(x_prime, tau):  # a smooth network of the timestep, recording ∂τ/∂t through forward AD
        seen.append(tau)
        return torch.sin(x_prime) * (1 + tau[:, None] / 1000)

    x_t, t = _query(sched, 1.0, n=32)
    kw = dict(prediction="eps", alpha=sched.alpha, sigma=sched.sigma)
    v = trigflow.alpha_sigma_teacher(model, SD, time_from_ratio=sched.timestep, **kw)
    _, dv_dt = torch.func.jvp(lambda tt: v(x_t, tt), (t,), (torch.ones_like(t),))
    h = 1e-6
    fd = (v(x_t, t + h) - v(x_t, t - h)) / (2 * h)
    assert torch.allclose(dv_dt, fd, rtol=1e-5, atol=1e-6)

    rounded = trigflow.alpha_sigma_teacher(model, SD, time_from_ratio=lambda rho: sched.timestep(rho).round(), **kw)
    tau_tangent = torch.func.jvp(lambda tt: sched.timestep(SD * torch.tan(tt)).round(), (t,), (torch.ones_like(t),))[1]
    assert (tau_tangent == 0).all()  # the network would never see t move
    tau_tangent = torch.func.jvp(lambda tt: sched.timestep(SD * torch.tan(tt)), (t,), (torch.ones_like(t),))[1]
    assert (tau_tangent.abs() > 1).all() and math.isfinite(tau_tangent.sum().item())
    assert rounded(x_t, t).shape == x_t.shape
