"""Discrete diffusion schedules made continuous, for teachers trained on integer timesteps (DDPM, DDIM).

Such a teacher was trained on x_i = √ᾱ_i·x0 + √(1−ᾱ_i)·ε at timesteps i = 0 … T−1. The TrigFlow adapter
(:func:`scm.trigflow.alpha_sigma_teacher`) queries it at a noise-to-signal ratio ρ = σ/α, which falls between
timesteps. The schedule's log-SNR λ_i = log(ᾱ_i/(1−ᾱ_i)) is interpolated linearly in the timestep, so ρ maps to the
fractional timestep τ with λ(τ) = −2 log ρ exactly, and α(τ)² = sigmoid(λ(τ)), σ(τ)² = sigmoid(−λ(τ)): the pair the
network sees has σ/α = ρ to rounding. τ(ρ) is continuous and piecewise linear in λ, so ∂/∂t reaches the network and
its JVP means something; rounding τ to the nearest integer would make ∂τ/∂t zero almost everywhere.

Range. τ is clamped to [0, τ_max], τ_max the last timestep of finite log-SNR: T−1, or T−2 under zero-terminal-SNR
rescaling (whose last ᾱ is 0, λ = −∞). A ρ below the first timestep's or above τ_max's is evaluated at the end of that
range, where σ/α no longer equals ρ; :meth:`DiscreteSchedule.in_range` says which queries that affects. For the
common 1,000-step schedules the range is ρ ∈ [0.01, 157] (DDPM linear) and covers sCM's sampling times.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DiscreteSchedule:
    """ᾱ_0 … ᾱ_{T−1} (non-increasing, in [0, 1)) as continuous functions of a fractional timestep τ."""

    def __init__(self, alphas_cumprod: Tensor):
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64, device="cpu").flatten()  # a table, never on meta
        if a.numel() < 2 or not torch.isfinite(a).all() or (a < 0).any() or (a >= 1).any():
            raise ValueError("alphas_cumprod must hold at least 2 finite values in [0, 1)")
        log_snr = torch.log(a) - torch.log1p(-a)  # λ_i = log(ᾱ_i/(1−ᾱ_i)); −∞ where ᾱ_i = 0
        finite = int(torch.isfinite(log_snr).sum())
        if finite < 2 or not torch.isfinite(log_snr[:finite]).all():
            raise ValueError("alphas_cumprod may reach 0 only at its end (zero terminal SNR)")
        self.log_snr_table = log_snr[:finite]
        if not (self.log_snr_table[1:] < self.log_snr_table[:-1]).all():
            raise ValueError("alphas_cumprod must decrease strictly (every timestep a new noise level)")
        self.alphas_cumprod = a

    @property
    def tau_max(self) -> float:
        """The last timestep of finite log-SNR."""
        return float(self.log_snr_table.numel() - 1)

    def log_snr(self, tau: Tensor) -> Tensor:
        """λ(τ): linear between integer timesteps, clamped to [0, τ_max]."""
        table = self.log_snr_table.to(device=tau.device, dtype=tau.dtype)
        tau = tau.clamp(0, self.tau_max)
        i = tau.detach().floor().clamp(max=self.tau_max - 1).long()
        w = tau - i.to(tau.dtype)
        return (1 - w) * table[i] + w * table[i + 1]

    def timestep(self, rho: Tensor) -> Tensor:
        """The fractional timestep τ with σ(τ)/α(τ) = ρ, i.e. λ(τ) = −2 log ρ (clamped to the range)."""
        table = self.log_snr_table.to(device=rho.device, dtype=rho.dtype)
        target = (-2 * torch.log(rho)).clamp(table[-1], table[0])
        # i with λ_i ≥ target ≥ λ_{i+1}: searchsorted on the increasing −λ.
        i = torch.searchsorted(-table, -target.detach().contiguous()).sub(1).clamp(0, table.numel() - 2)
        w = (table[i] - target) / (table[i] - table[i + 1])
        return i.to(rho.dtype) + w

    def alpha(self, tau: Tensor) -> Tensor:
        """α(τ) = √sigmoid(λ(τ))."""
        return torch.sigmoid(self.log_snr(tau)).sqrt()

    def sigma(self, tau: Tensor) -> Tensor:
        """σ(τ) = √sigmoid(−λ(τ))."""
        return torch.sigmoid(-self.log_snr(tau)).sqrt()

    def in_range(self, rho: Tensor) -> Tensor:
        """Whether ρ lies within the schedule's noise levels (elsewhere the teacher is queried at the range's end)."""
        target = -2 * torch.log(rho)
        return (target <= self.log_snr_table[0].item()) & (target >= self.log_snr_table[-1].item())
