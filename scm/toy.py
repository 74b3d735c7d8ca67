"""An isotropic Gaussian mixture whose diffusion quantities are known in closed form.

For x' = α·x0 + σ·ε with x0 ~ Σ_k π_k N(μ_k, s_k² I), the posterior mean E[x0 | x'] is exact, so every teacher
parameterisation (TrigFlow velocity, EDM denoiser, ε/v-prediction, rectified flow) has an exact reference. The tests
use it as an exact sCD teacher and to check the teacher adapters; the README's quick example uses it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from scm.trigflow import append_dims


@dataclass(frozen=True)
class GaussianMixture:
    means: Tensor  # (K, D)
    stds: Tensor  # (K,)
    weights: Tensor  # (K,), sums to 1

    @staticmethod
    def ring(k: int = 4, dim: int = 2, radius: float = 0.68, std: float = 0.1, dtype: torch.dtype = torch.float64) -> GaussianMixture:
        """``k`` equal components on a circle; the defaults give per-dimension std ≈ 0.5 = σ_d."""
        angles = torch.arange(k, dtype=dtype) * 2 * math.pi / k + math.pi / k
        means = torch.zeros(k, dim, dtype=dtype)
        means[:, 0], means[:, 1] = radius * torch.cos(angles), radius * torch.sin(angles)
        return GaussianMixture(means, torch.full((k,), std, dtype=dtype), torch.full((k,), 1 / k, dtype=dtype))

    def sample(self, n: int, generator: torch.Generator | None = None, labels: Tensor | None = None) -> Tensor:
        """``n`` draws; with ``labels`` (N,), draw i comes from component ``labels[i]`` (the components as classes)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator) if labels is None else labels
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=self.means.dtype)
        return self.means[k] + self.stds[k, None] * eps

    def posterior_mean(self, x: Tensor, alpha: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        """E[x0 | α·x0 + σ·ε = x] for per-sample α, σ of shape (N,) (or scalars); with ``labels``, E[x0 | x, k]
        for component k = labels[i] (class-conditional)."""
        x = x.to(self.means.dtype)
        a = append_dims(torch.as_tensor(alpha, dtype=x.dtype).expand(x.shape[0]), 3)  # (N, 1, 1)
        s = append_dims(torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]), 3)
        var = a**2 * self.stds[None, :, None] ** 2 + s**2  # (N, K, 1): marginal variance per component
        diff = x[:, None, :] - a * self.means[None]  # (N, K, D)
        D = x.shape[1]
        log_r = torch.log(self.weights)[None] - 0.5 * (diff**2).sum(-1) / var[..., 0] - 0.5 * D * torch.log(var[..., 0])
        r = torch.softmax(log_r, dim=1)  # (N, K) responsibilities
        if labels is not None:
            r = torch.nn.functional.one_hot(labels, len(self.weights)).to(r.dtype)
        x0_k = self.means[None] + a * self.stds[None, :, None] ** 2 / var * diff  # (N, K, D)
        return (r[..., None] * x0_k).sum(1)

    def trigflow_velocity(self, sigma_data: float):
        """The exact PF-ODE velocity σ_d F(x_t, t) = (cos t·x_t − E[x0 | x_t])/sin t for x_t = cos t·x0 + sin t·z;
        called with ``labels``, the class-conditional one (E[x0 | x_t, k])."""

        def velocity_fn(x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
            t64 = t.to(self.means.dtype)
            x0_hat = self.posterior_mean(x_t, torch.cos(t64), sigma_data * torch.sin(t64), labels)
            c, s = append_dims(torch.cos(t64), 2), append_dims(torch.sin(t64), 2)
            return ((c * x_t.to(x0_hat.dtype) - x0_hat) / s).to(x_t.dtype)

        return velocity_fn


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (≥ 0, 0 iff equal distributions), V-statistic."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
