"""Samplers: per-sample seeds, paper times, ODE solver order, consistency sampling."""

import math

import pytest
import torch

from scm import nn as scm_nn
from scm import samplers
from scm import trigflow
from scm.toy import GaussianMixture

SD = 0.5


def test_same_seed_same_image_whatever_the_batch():
    torch.manual_seed(0)
    net = scm_nn.UNet(scm_nn.unet_config("cpu-xs", in_channels=2)).eval()
    v = lambda x, t: trigflow.velocity(net, x, t, SD)
    seeds = [7, 3, 11, 42, 5]
    ts = samplers.consistency_times(2, SD)
    batch = samplers.sample_consistency(v, samplers.noise_from_seeds(seeds, (2, 7, 7), 2, sigma_data=SD), ts=ts)
    single = samplers.sample_consistency(v, samplers.noise_from_seeds([42], (2, 7, 7), 2, sigma_data=SD), ts=ts)
    assert torch.allclose(batch[3], single[0], atol=1e-5)
    pair = samplers.sample_consistency(v, samplers.noise_from_seeds([1, 42], (2, 7, 7), 2, sigma_data=SD), ts=ts)
    assert torch.allclose(pair[1], single[0], atol=1e-5)


def test_noise_has_sigma_data_std():
    (z,) = samplers.noise_from_seeds(range(2000), (50,), 1, sigma_data=SD)
    assert z.std().item() == pytest.approx(SD, rel=0.01)


def test_paper_sampling_times():
    assert samplers.consistency_times(1, SD) == [pytest.approx(math.atan(80 / SD))]
    assert samplers.consistency_times(2, SD) == [pytest.approx(math.atan(160)), 1.1]  # t_mid = 1.1, paper §5.2
    ts = samplers.consistency_times(4, SD)
    assert len(ts) == 4 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] > 0
    kt = samplers.karras_times(18, SD)
    assert len(kt) == 19 and kt[0] == pytest.approx(math.atan(160)) and kt[-1] == 0.0
    assert kt[-2] == pytest.approx(math.atan(0.002 / SD))
    assert samplers.teacher_nfe("dpm2", 18) == 35 and samplers.teacher_nfe("euler", 18) == 18


def test_one_step_is_the_consistency_function_at_t_max():
    net = scm_nn.MLP(scm_nn.MLPConfig()).eval()
    v = lambda x, t: trigflow.velocity(net, x, t, SD)
    z = samplers.noise_from_seeds([0, 1, 2], (2,), 1, sigma_data=SD)
    t = torch.full((3,), trigflow.t_max(SD))
    assert torch.allclose(samplers.sample_consistency(v, z, ts=[trigflow.t_max(SD)]), trigflow.consistency_fn(z[0], t, v(z[0], t)))


def test_two_step_renoises_with_the_second_noise():
    net = scm_nn.MLP(scm_nn.MLPConfig()).eval()
    v = lambda x, t: trigflow.velocity(net, x, t, SD)
    noise = samplers.noise_from_seeds([0, 1], (2,), 2, sigma_data=SD)
    x0 = samplers.sample_consistency(v, noise[:1], ts=[trigflow.t_max(SD)])
    t = torch.full((2,), 1.1)
    x_mid = math.cos(1.1) * x0 + math.sin(1.1) * noise[1]
    assert torch.allclose(samplers.sample_consistency(v, noise, ts=[trigflow.t_max(SD), 1.1]), trigflow.consistency_fn(x_mid, t, v(x_mid, t)), atol=1e-6)


def test_ode_solvers_converge_and_dpm2_is_second_order():
    """On the exact GMM velocity, Euler's error halves and DPM-Solver-2's quarters when the steps double."""
    gmm = GaussianMixture.ring()
    v = gmm.trigflow_velocity(SD)
    noise = samplers.noise_from_seeds(range(256), (2,), 1, sigma_data=SD, dtype=torch.float64)
    ts = lambda n: torch.linspace(1.45, 0.2, n + 1, dtype=torch.float64).tolist()  # avoid the stiff ends
    ref = samplers.sample_dpm2(v, noise, ts=ts(1024))
    err = lambda sampler, n: (sampler(v, noise, ts=ts(n)) - ref).abs().max().item()
    e_euler = [err(samplers.sample_euler, n) for n in (16, 32, 64)]
    e_dpm2 = [err(samplers.sample_dpm2, n) for n in (16, 32, 64)]
    assert e_euler[1] / e_euler[2] == pytest.approx(2, rel=0.25)
    assert e_dpm2[1] / e_dpm2[2] > 3.2
    assert e_dpm2[2] < e_euler[2] / 5


def test_teacher_sampler_on_exact_velocity_reproduces_the_mixture():
    from scm.toy import energy_distance

    gmm = GaussianMixture.ring()
    noise = samplers.noise_from_seeds(range(1000), (2,), 1, sigma_data=SD, dtype=torch.float64)
    x = samplers.sample_dpm2(gmm.trigflow_velocity(SD), noise, ts=samplers.karras_times(18, SD))
    data = gmm.sample(1000, torch.Generator().manual_seed(0))
    assert energy_distance(x, data) < 0.005 < energy_distance(noise[0], data)


def test_bad_sampler_inputs():
    v = lambda x, t: x
    z = samplers.noise_from_seeds([0], (2,), 1, sigma_data=SD)
    with pytest.raises(ValueError, match="strictly decreasing"):
        samplers.sample_euler(v, z, ts=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"in \[0, pi/2\]"):
        samplers.sample_euler(v, z, ts=[2.0, 0.0])
    with pytest.raises(ValueError, match="needs 2 noise tensors"):
        samplers.sample_consistency(v, z, ts=[1.5, 1.1])
    with pytest.raises(ValueError, match="t_mid must lie in"):
        samplers.consistency_times(2, SD, t_mid=1.6)
    with pytest.raises(ValueError, match="unknown teacher sampler 'heun'"):
        samplers.teacher_nfe("heun", 10)
