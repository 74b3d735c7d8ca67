"""study/sampling.py: images depend only on their own seeds; non-finite latents are refused, never written black."""

from __future__ import annotations

import pytest
import torch

from scm import nn as scm_nn
from study.codec import Codec
from study.errors import StageError
from study.params import SampleParams
from study.sampling import Sampler, build_samplers, generate, seeds_of
from helpers import section

SHAPE = (1, 8, 8)


def _codec() -> Codec:
    return Codec(None, SHAPE, torch.zeros(1), torch.full((1,), 0.5), 0.5, batch_size=4)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = scm_nn.UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), groups=4)
    return scm_nn.UNet(cfg).eval().requires_grad_(False)


def test_each_image_depends_only_on_its_seed():
    params: SampleParams = section("sample", teacher_steps=2)
    samplers = build_samplers(params, 0.5, _net(), _net())
    seeds = seeds_of(1, 6)
    assert seeds == [1_000_000 + i for i in range(6)]
    for name, sampler in samplers.items():
        whole = generate(sampler, _codec(), seeds, SHAPE, sigma_data=0.5, batch_size=6, device="cpu")
        parts = generate(sampler, _codec(), seeds, SHAPE, sigma_data=0.5, batch_size=4, device="cpu")
        alone = generate(sampler, _codec(), seeds[3:4], SHAPE, sigma_data=0.5, batch_size=1, device="cpu")
        assert whole.dtype == torch.uint8 and torch.equal(whole, parts), name
        assert torch.equal(whole[3:4], alone), name


def test_non_finite_latents_are_refused():
    diverged = Sampler("scm1", lambda v, noise, ts: torch.full_like(noise[0], float("nan")), lambda x, t: x, [1.5], 1, 1)
    with pytest.raises(StageError, match=r"^sampler scm1: NaN or inf latents for seeds 0\.\.3 \(a diverged model\?\)"):
        generate(diverged, _codec(), list(range(4)), SHAPE, sigma_data=0.5, batch_size=4, device="cpu")
