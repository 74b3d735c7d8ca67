"""Networks: forward-mode AD through the full nets, attention ops, conditioning, scales."""

import pytest
import torch

from scm import nn as snn
from scm.losses import fd_tangent, jvp_tangent


def small_unet(**kw):
    cfg = dict(in_channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,), num_heads=2, groups=8)
    cfg.update(kw)
    return snn.UNet(snn.UNetConfig(**cfg))


@pytest.mark.parametrize("shape", [(4, 7, 7), (4, 8, 8), (1, 28, 28)])
def test_unet_any_size_keeps_shape(shape):
    net = small_unet(in_channels=shape[0])
    x = torch.randn(2, *shape)
    assert net(x, torch.rand(2)).shape == x.shape


def test_no_batchnorm_anywhere():
    for net in (small_unet(), snn.MLP(snn.MLPConfig())):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("make", [small_unet, lambda: snn.MLP(snn.MLPConfig(dim=3))], ids=["unet", "mlp"])
def test_full_network_jvp_matches_float64_finite_difference(make):
    torch.manual_seed(0)
    net = make().double()
    shape = (3, 4, 7, 7) if isinstance(net, snn.UNet) else (3, 3)
    x_t = 0.5 * torch.randn(shape, dtype=torch.float64)
    t = torch.tensor([0.05, 0.8, 1.55], dtype=torch.float64)
    dxt_dt = 0.5 * torch.randn(shape, dtype=torch.float64)
    F1, J1 = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5)
    F2, J2 = fd_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, h=1e-5)
    assert torch.allclose(F1, F2, atol=1e-12)
    assert torch.allclose(J1, J2, atol=1e-7, rtol=1e-6), (J1 - J2).abs().max()
    assert J1.abs().max() > 1e-3  # a real, non-zero tangent


def test_math_and_sdpa_attention_agree_and_context_restores():
    net = small_unet()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with snn.attention_op(net, "sdpa"):
        y_sdpa = net(x, t)
        assert all(m.op == "sdpa" for m in net.modules() if isinstance(m, snn.Attention))
    assert all(m.op == "math" for m in net.modules() if isinstance(m, snn.Attention))
    assert torch.allclose(net(x, t), y_sdpa, atol=1e-5)
    with pytest.raises(ValueError, match="attention op must be one of math, sdpa"):
        snn.set_attention_op(net, "flash")


def test_time_embedding_stays_float32_under_autocast():
    emb = snn.PositionalEmbedding(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert emb(torch.rand(3)).dtype == torch.float32


def test_pnorm_has_unit_rms_over_channels():
    a = torch.randn(5, 32) * 7
    assert torch.allclose(snn.pnorm(a).square().mean(dim=1), torch.ones(5), atol=1e-5)


def test_class_conditioning_changes_output_and_null_label_is_default():
    net = small_unet(num_classes=10)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    y0, y1 = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    assert torch.equal(net(x, t), net(x, t, torch.tensor([10, 10])))


def test_adaptive_weight_starts_at_zero():
    assert torch.equal(snn.AdaptiveWeight()(torch.rand(4)), torch.zeros(4))


def test_scales_parameter_counts_are_ordered_and_paper_sized():
    counts = {s: snn.scale_param_count(s) for s in snn.SCALES}
    assert counts["cpu-xs"] < counts["cpu-s"] < counts["cpu-m"] < counts["cpu-l"]
    assert counts["S"] < counts["M"] < counts["L"] < counts["XL"] < counts["XXL"]
    # Our U-Net at the paper's widths lands within 15% of the paper's EDM2 counts (Table 4: 280M ... 1.52B).
    for s, paper in {"S": 280.2e6, "M": 497.8e6, "L": 777.6e6, "XL": 1119.4e6, "XXL": 1523.4e6}.items():
        assert abs(counts[s] / paper - 1) < 0.15, (s, counts[s])
    assert snn.count_params(snn.UNet(snn.unet_config("cpu-s", in_channels=4))) == counts["cpu-s"]


def test_unknown_scale_and_bad_configs():
    with pytest.raises(ValueError, match=r"unknown scale 'huge' \(accepted: cpu-xs, cpu-s"):
        snn.unet_config("huge", in_channels=4)
    with pytest.raises(ValueError, match="dropout"):
        snn.UNet(snn.UNetConfig(dropout=1.5))
    with pytest.raises(ValueError, match="divisible"):
        snn.UNet(snn.UNetConfig(model_channels=12, groups=8))
