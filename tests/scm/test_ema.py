"""EMA: half-life in images and EDM2's power EMA."""

import pytest
import torch

from scm.ema import EMA, PowerEMA, power_exponent


def _net(value):
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, value)
    return net


def test_half_life_in_images():
    ema = EMA(_net(1.0), half_life=1000)
    target = _net(0.0)
    for step in range(1, 11):  # 10 steps of 100 images = one half-life
        ema.update(target, step * 100, 100)
    assert ema.net.weight.item() == pytest.approx(0.5)


def test_paper_cifar_beta():
    """0.5 Mimg half-life at batch 512 gives β ≈ 0.99929 per step (docs/method.md, "EMA")."""
    assert EMA(_net(0.0), 0.5e6).beta(0, 512) == pytest.approx(0.99929, abs=1e-5)


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2])
def test_power_exponent_solves_edm2_equation(std):
    g = power_exponent(std)
    assert (g + 1) / ((g + 2) ** 2 * (g + 3)) == pytest.approx(std**2, rel=1e-9)


def test_power_ema_averages_the_whole_trajectory_with_power_weights():
    """With β_t = (1 − 1/t)^(γ+1), the EMA of a weight trajectory w_t is Σ t^γ w_t / Σ t^γ (EDM2 Eq. 2)."""
    ema = PowerEMA(_net(123.0), std=0.1)
    n = 200
    for t in range(1, n + 1):
        ema.update(_net(float(t)), t * 8, 8)
    ts = torch.arange(1, n + 1, dtype=torch.float64)
    w = ts ** ema.gamma
    assert ema.net.weight.item() == pytest.approx(float((w * ts).sum() / w.sum()), rel=1e-3)


def test_bad_ema_arguments():
    with pytest.raises(ValueError, match="half_life must be > 0"):
        EMA(_net(0.0), 0)
    with pytest.raises(ValueError, match="sigma_rel"):
        PowerEMA(_net(0.0), 0.5)
