"""TrigFlow identities (sCM v2 §3, App. B) and the teacher adapters against closed forms."""

import math

import pytest
import torch

from scm import trigflow
from scm.toy import GaussianMixture

SD = 0.5


def test_sigma_t_round_trip():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    t = trigflow.sigma_to_t(sigma, SD)
    assert torch.allclose(trigflow.t_to_sigma(t, SD), sigma, rtol=1e-12)
    assert torch.allclose(trigflow.sigma_to_t(trigflow.t_to_sigma(t, SD), SD), t, atol=1e-12)


def test_t_max_is_arctan_80_over_sigma_data():
    assert trigflow.t_max(0.5) == pytest.approx(math.atan(160.0))
    assert trigflow.t_max(0.5) == pytest.approx(1.5645, abs=1e-4)


def test_boundary_condition_f_x_0_is_x():
    x = torch.randn(8, 3, 5, 5)
    F = torch.randn_like(x) * 100  # whatever the network says
    assert torch.equal(trigflow.consistency_fn(x, torch.zeros(8), F), x)


def test_forward_process_has_data_std_at_every_t():
    x0 = SD * torch.randn(200_000, 1, dtype=torch.float64)
    z = SD * torch.randn_like(x0)
    for t in (0.1, 0.7, 1.5):
        x_t = trigflow.add_noise(x0, z, torch.full((x0.shape[0],), t, dtype=torch.float64))
        assert x_t.std().item() == pytest.approx(SD, rel=0.01)


def test_velocity_target_is_time_derivative_of_x_t():
    x0, z = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t, h = torch.rand(4, dtype=torch.float64) + 0.1, 1e-6
    fd = (trigflow.add_noise(x0, z, t + h) - trigflow.add_noise(x0, z, t - h)) / (2 * h)
    assert torch.allclose(trigflow.velocity_target(x0, z, t), fd, atol=1e-8)


def test_time_proposal_is_log_normal_in_sigma():
    t = trigflow.t_from_normal(torch.randn(200_000, generator=torch.Generator().manual_seed(0)), -1.0, 1.4, SD)
    log_sigma = torch.log(trigflow.t_to_sigma(t.double(), SD))
    assert log_sigma.mean().item() == pytest.approx(-1.0, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.4, abs=0.01)
    assert (t > 0).all() and (t < math.pi / 2).all()


def test_ddim_step_to_zero_is_the_consistency_function():
    x, F = torch.randn(4, 2), torch.randn(4, 2)
    s = torch.rand(4) + 0.2
    assert torch.allclose(trigflow.ddim_step(x, s, torch.zeros(4), F), trigflow.consistency_fn(x, s, F))


@pytest.mark.parametrize("sigma_data", [0.0, -1.0, float("nan")])
def test_bad_sigma_data(sigma_data):
    with pytest.raises(ValueError, match="sigma_data"):
        trigflow.t_max(sigma_data)


def test_non_finite_data_is_refused():
    with pytest.raises(ValueError, match="x0 contains non-finite"):
        trigflow.check_finite(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------------------------------------------------------
# Teacher adapters: exact models of a Gaussian mixture in each parameterisation must give the exact TrigFlow velocity.

GMM = GaussianMixture.ring()


def _query(n=64):
    g = torch.Generator().manual_seed(1)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 1.5 + 0.03
    x_t = trigflow.add_noise(GMM.sample(n, g), SD * torch.randn(n, 2, generator=g, dtype=torch.float64), t)
    return x_t, t


def test_edm_teacher_matches_trigflow_velocity():
    exact = GMM.trigflow_velocity(SD)
    denoiser = lambda x_sigma, sigma: GMM.posterior_mean(x_sigma, torch.ones_like(sigma), sigma)  # x0 + σε
    x_t, t = _query()
    assert torch.allclose(trigflow.edm_teacher(denoiser, SD)(x_t, t), exact(x_t, t), atol=1e-10)


def test_rectified_flow_teacher_matches_trigflow_velocity():
    exact = GMM.trigflow_velocity(SD)

    def rf_model(x_s, s):  # v = ε − y0 on x_s = (1−s)·x0/σ_d + s·ε
        y0 = GMM.posterior_mean(x_s, (1 - s) / SD, s) / SD
        eps = (x_s - (1 - s)[:, None] * y0) / s[:, None]
        return eps - y0

    x_t, t = _query()
    assert torch.allclose(trigflow.rectified_flow_teacher(rf_model, SD)(x_t, t), exact(x_t, t), atol=1e-10)
    scaled = lambda x_s, s1000: rf_model(x_s, s1000 / 1000)
    assert torch.allclose(trigflow.rectified_flow_teacher(scaled, SD, time_scale=1000)(x_t, t), exact(x_t, t), atol=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_alpha_sigma_teacher_matches_trigflow_velocity(prediction):
    exact = GMM.trigflow_velocity(SD)
    alpha = lambda s: torch.cos(math.pi / 2 * s)  # a VP cosine schedule on s ∈ [0, 1]
    sigma = lambda s: torch.sin(math.pi / 2 * s)
    time_from_ratio = lambda rho: torch.atan(rho) * 2 / math.pi

    def model(x, s):
        a, b = alpha(s)[:, None], sigma(s)[:, None]
        x0 = GMM.posterior_mean(x, alpha(s), sigma(s))
        eps = (x - a * x0) / b
        return eps if prediction == "eps" else a * eps - b * x0

    x_t, t = _query()
    velocity = trigflow.alpha_sigma_teacher(model, SD, prediction=prediction, alpha=alpha, sigma=sigma, time_from_ratio=time_from_ratio)
    assert torch.allclose(velocity(x_t, t), exact(x_t, t), atol=1e-9)


def test_alpha_sigma_teacher_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="prediction must be one of 'eps', 'v', 'x0'"):
        trigflow.alpha_sigma_teacher(lambda x, s: x, SD, prediction="sample", alpha=torch.cos, sigma=torch.sin, time_from_ratio=torch.atan)

