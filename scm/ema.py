"""Exponential moving averages of network weights (sCM v2 App. G).

- :class:`EMA` with a half-life counted in images (EDM; CIFAR-10 CMs use 0.5 Mimg): β = 0.5^(B/half_life).
- :class:`PowerEMA`, EDM2's power-function EMA with relative std σ_rel (ImageNet CMs sample with σ_rel = 0.05).

Both keep a float32 copy of the parameters and buffers and expose it as a module through :meth:`copy_to`.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn


class _Averaged:
    def __init__(self, net: nn.Module):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def _lerp(self, net: nn.Module, beta: float) -> None:
        for p_ema, p in zip(self.net.parameters(), net.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.net.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state)


class EMA(_Averaged):
    """EMA with a half-life in images: after ``half_life`` images the old weights count for one half."""

    def __init__(self, net: nn.Module, half_life: float):
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 images, got {half_life}")
        super().__init__(net)
        self.half_life = half_life

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        return 0.5 ** (batch_size / self.half_life)

    def update(self, net: nn.Module, cur_nimg: int, batch_size: int) -> None:
        self._lerp(net, self.beta(cur_nimg, batch_size))


def power_exponent(std: float) -> float:
    """EDM2 (Karras et al. 2024, Eq. 3 / Alg. 2): the γ with σ_rel² = (γ+1)/((γ+2)²(γ+3))."""
    tmp = std**-2
    roots = np.roots([1, 7, 16 - tmp, 12 - tmp])
    return float(roots[np.isreal(roots)].real.max())


class PowerEMA(_Averaged):
    """EDM2's power-function EMA: β_t = (1 − 1/t)^(γ+1) at step t = cur_nimg/batch_size, γ from σ_rel."""

    def __init__(self, net: nn.Module, std: float):
        if not 0 < std < 0.289:
            raise ValueError(f"power EMA std (sigma_rel) must be in (0, 0.289), got {std}")
        super().__init__(net)
        self.std = std
        self.gamma = power_exponent(std)

    def beta(self, cur_nimg: int, batch_size: int) -> float:
        t = cur_nimg / batch_size
        return (1 - 1 / t) ** (self.gamma + 1) if t > 1 else 0.0

    def update(self, net: nn.Module, cur_nimg: int, batch_size: int) -> None:
        """``cur_nimg`` counts the images seen *including* this step's batch."""
        self._lerp(net, self.beta(cur_nimg, batch_size))
