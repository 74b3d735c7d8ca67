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


def _conditional_net(guidance_embedding: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = scm_nn.UNetConfig(in_channels=1, model_channels=8, channel_mult=(1, 2), groups=4, num_classes=5,
                            guidance_embedding=guidance_embedding)
    net = scm_nn.UNet(cfg).eval().requires_grad_(False)
    for p in net.parameters():  # outputs that depend on the labels and on s (zero-initialised layers otherwise)
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def test_labels_come_from_the_seeds_alone():
    from scm.samplers import labels_from_seeds

    seeds = seeds_of(2, 2000)
    labels = labels_from_seeds(seeds, 10)
    assert labels.dtype == torch.int64 and torch.equal(labels[5:9], labels_from_seeds(seeds[5:9], 10))
    assert torch.bincount(labels, minlength=10).min() > 150  # uniform over the classes (expected 200 each)
    assert not torch.equal(labels[:64], labels_from_seeds(seeds_of(3, 64), 10))


def test_conditional_samplers_use_labels_and_each_samplers_guidance():
    """Each image of a conditional model depends on its seed alone (noise and label); the teacher's CFG scale and the
    student's guidance input change the images; a student without a guidance input refuses s != 1."""
    teacher, student = _conditional_net(), _conditional_net(guidance_embedding=True, seed=1)
    seeds = seeds_of(0, 6)
    plain = build_samplers(section("sample", teacher_steps=2), 0.5, teacher, student)
    guided = build_samplers(section("sample", teacher_steps=2, teacher_guidance=1.4, guidance_1step=1.5,
                                    guidance_2step=1.4), 0.5, teacher, student)
    for name in plain:
        assert plain[name].num_classes == 5 and guided[name].guidance > 1
        whole = generate(guided[name], _codec(), seeds, SHAPE, sigma_data=0.5, batch_size=6, device="cpu")
        alone = generate(guided[name], _codec(), seeds[2:3], SHAPE, sigma_data=0.5, batch_size=1, device="cpu")
        assert torch.equal(whole[2:3], alone), name
        assert not torch.equal(whole, generate(plain[name], _codec(), seeds, SHAPE, sigma_data=0.5, batch_size=6,
                                               device="cpu")), name
    with pytest.raises(StageError, match=r"^sample.guidance_1step: the student has no guidance input"):
        build_samplers(section("sample", guidance_1step=1.3), 0.5, teacher, _conditional_net())
    with pytest.raises(StageError, match="the student has 0 classes, its teacher 5"):
        build_samplers(section("sample"), 0.5, teacher, _net())
