"""EDM2's magnitude-preserving U-Net: the paper's parameter counts, magnitude preservation, the sCM tangent against a
float64 finite difference, conditioning, and one real training step (forced weight normalisation in place)."""

import math

import pytest
import torch

from scm import mpunet
from scm.losses import SCMConfig, fd_tangent, jvp_tangent, scm_loss
from scm.nn import attention_op, count_params
from scm.mpunet import MPUNet, MPUNetConfig

# sCM v2 App. G, Table 4 (ImageNet 64² and 512², the same networks): channels -> parameters (M).
PAPER_PARAMS_M = {"S": (192, 280.2), "M": (256, 497.8), "L": (320, 777.6), "XL": (384, 1119.4), "XXL": (448, 1523.4)}


def tiny(**kw) -> MPUNet:
    cfg = dict(in_channels=3, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,),
               channels_per_head=8)
    cfg.update(kw)
    return MPUNet(MPUNetConfig(**cfg))


@pytest.mark.parametrize("scale", list(PAPER_PARAMS_M))
def test_parameter_counts_are_the_papers(scale):
    channels, paper_m = PAPER_PARAMS_M[scale]
    with torch.device("meta"):
        edm2 = MPUNet(MPUNetConfig(model_channels=channels, num_classes=1000, double_norm=False))
        scm = MPUNet(MPUNetConfig(model_channels=channels, num_classes=1000, double_norm=True))
    # EDM2's own network (latents 4×64×64, 1000 classes): Table 4 within 0.5 % (measured: 0.02 % at most).
    assert abs(count_params(edm2) / (paper_m * 1e6) - 1) < 0.005, count_params(edm2)
    # sCM's adaptive double normalisation adds exactly one emb -> channels shift projection per block and drops
    # EDM2's scalar gains.
    blocks = [m for m in scm.modules() if isinstance(m, mpunet.MPBlock)]
    cemb = channels * 4
    added = sum(cemb * b.conv_res1.out_channels - 1 for b in blocks)
    assert count_params(scm) - count_params(edm2) == added
    assert 0.045 < added / count_params(edm2) < 0.053


def test_magnitude_preserving_primitives():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, 8, 8, generator=g), torch.randn(64, 256, 8, 8, generator=g)
    rms = lambda x: x.square().mean().sqrt().item()
    assert rms(mpunet.mp_silu(a)) == pytest.approx(1.0, abs=0.01)
    assert rms(mpunet.mp_sum(a, b, t=0.3)) == pytest.approx(1.0, abs=0.01)
    assert rms(mpunet.mp_cat(a[:, :64], b, t=0.5)) == pytest.approx(1.0, abs=0.01)
    assert rms(mpunet.normalize(5 * a, dim=1)) == pytest.approx(1.0, abs=1e-3)
    assert rms(mpunet.MPPositional(192)(torch.rand(512) * math.pi / 2)) == pytest.approx(1.0, abs=1e-6)
    conv = mpunet.MPConv(256, 128, kernel=(3, 3))
    assert rms(conv(a)) == pytest.approx(1.0, abs=0.1)  # unit-norm filters keep the magnitude of white input


def test_output_starts_at_zero_and_blocks_keep_unit_magnitude():
    torch.manual_seed(0)
    net = tiny(model_channels=32)
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(net(x, torch.rand(8)), torch.zeros_like(x))  # EDM2: out_gain starts at 0
    emb = net.embed(torch.rand(8), None, None)
    h = net.enc["l0_conv"](torch.cat([x, torch.ones_like(x[:, :1])], dim=1))
    for name, m in list(net.enc.items())[1:]:
        h = m(h, emb)
        assert 0.5 < h.square().mean().sqrt() < 2.0, name


@pytest.mark.parametrize("double_norm", [True, False])
def test_jvp_matches_float64_finite_difference(double_norm):
    torch.manual_seed(0)
    net = tiny(num_classes=5, double_norm=double_norm, guidance_embedding=True).double()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
        net.emb_guidance_gain.fill_(0.5)
        for m in net.modules():
            if isinstance(m, mpunet.MPBlock) and not double_norm:
                m.emb_gain.fill_(0.7)
    x_t = 0.5 * torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.05, 0.8, 1.55], dtype=torch.float64)
    dxt_dt = 0.5 * torch.randn_like(x_t)
    labels = torch.tensor([0, 4, 5])  # 5 = no label
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    F1, J1 = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels, guidance=s)
    F2, J2 = fd_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels, guidance=s, h=1e-5)
    assert torch.allclose(F1, F2, atol=1e-12)
    assert torch.allclose(J1, J2, atol=1e-7, rtol=1e-6), (J1 - J2).abs().max()
    assert J1.abs().max() > 1e-3


def test_conditioning_labels_null_label_and_guidance():
    torch.manual_seed(0)
    net = tiny(num_classes=4, guidance_embedding=True).eval()  # eval: no in-place weight normalisation between calls
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    out = lambda **kw: net(x, t, **kw)
    assert torch.equal(out(class_labels=torch.tensor([4, 4])), out())  # index num_classes = no label = None
    assert not torch.allclose(out(class_labels=torch.tensor([0, 0])), out(class_labels=torch.tensor([1, 1])))
    assert torch.equal(out(guidance=torch.ones(2)), out())  # guidance defaults to s = 1
    # The guidance embedding's gain starts at 0: a student copied from its teacher is the teacher at every s.
    assert torch.equal(out(guidance=torch.full((2,), 2.0)), out())
    with torch.no_grad():
        net.emb_guidance_gain.fill_(1.0)
    assert not torch.allclose(out(guidance=torch.full((2,), 2.0)), out())


def test_math_and_sdpa_attention_agree():
    torch.manual_seed(0)
    net = tiny().eval()
    with torch.no_grad():
        net.out_gain.fill_(1.0)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with attention_op(net, "sdpa"):
        y_sdpa = net(x, t)
    assert torch.allclose(net(x, t), y_sdpa, atol=1e-5)


def test_dropout_only_at_chosen_levels():
    net = tiny(dropout=0.4, dropout_levels=(1,), channel_mult=(1, 2, 2))
    rates = {name: m.dropout.p for name, m in net.enc.items() if isinstance(m, mpunet.MPBlock)}
    assert rates == {"l0_block0": 0.0, "l1_down": 0.4, "l1_block0": 0.4, "l2_down": 0.0, "l2_block0": 0.0}
    with pytest.raises(ValueError, match="dropout_levels must index channel_mult"):
        MPUNetConfig(dropout_levels=(7,)).validate()


def test_training_step_forces_unit_weights_in_place_and_keeps_the_graph_valid():
    """sCT step: the no-grad JVP, then the grad forward (which renormalises the weights in place), then backward."""
    torch.manual_seed(0)
    net = tiny(dropout=0.1).train()
    with torch.no_grad():
        net.out_gain.fill_(1.0)  # at 0 (its initial value) no gradient reaches the other weights
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    conv = net.enc["l0_conv"]
    for step in range(3):
        out = scm_loss(net, torch.randn(4, 3, 8, 8), cfg=SCMConfig(sigma_data=0.5, tangent_warmup_steps=0), step=step)
        opt.zero_grad()
        out.loss.backward()
        norms = conv.weight.detach().flatten(1).norm(dim=1) / math.sqrt(conv.weight[0].numel())
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)  # forced to unit rms by the forward
        assert conv.weight.grad.abs().max() > 0
        before = conv.weight.detach().clone()
        opt.step()
        assert not torch.equal(conv.weight, before)
    # A no-grad call (sampling, the tangent) leaves the weights as they are.
    net.enc["l0_conv"].weight.data.mul_(3)
    with torch.no_grad():
        net(torch.randn(1, 3, 8, 8), torch.rand(1))
    assert conv.weight.detach().flatten(1).norm(dim=1).mean() > 2.5


def test_bad_configs():
    for kw, match in [(dict(model_channels=0), "model_channels must be >= 1"),
                      (dict(attn_levels=(4,)), "attn_levels must index"),
                      (dict(time_embedding="learned"), "time_embedding must be"),
                      (dict(dropout=1.0), "dropout must be in")]:
        with pytest.raises(ValueError, match=match):
            MPUNet(MPUNetConfig(**kw))
