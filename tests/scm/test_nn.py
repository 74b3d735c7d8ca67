"""Networks: forward-mode AD through the full nets (and its fast path), attention ops, conditioning, scales."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from scm import nn as scm_nn
from scm.losses import fd_tangent, jvp_tangent


def small_unet(**kw):
    cfg = dict(in_channels=4, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,), num_heads=2, groups=8)
    cfg.update(kw)
    return scm_nn.UNet(scm_nn.UNetConfig(**cfg))


@pytest.mark.parametrize("shape", [(4, 7, 7), (4, 8, 8), (1, 28, 28)])
def test_unet_any_size_keeps_shape(shape):
    net = small_unet(in_channels=shape[0])
    x = torch.randn(2, *shape)
    assert net(x, torch.rand(2)).shape == x.shape


def test_no_batchnorm_anywhere():
    for net in (small_unet(), scm_nn.MLP(scm_nn.MLPConfig())):
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("make", [small_unet, lambda: scm_nn.MLP(scm_nn.MLPConfig(dim=3))], ids=["unet", "mlp"])
def test_full_network_jvp_matches_float64_finite_difference(make):
    torch.manual_seed(0)
    net = make().double()
    shape = (3, 4, 7, 7) if isinstance(net, scm_nn.UNet) else (3, 3)
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
    with scm_nn.attention_op(net, "sdpa"):
        y_sdpa = net(x, t)
        assert all(m.op == "sdpa" for m in net.modules() if isinstance(m, scm_nn.Attention))
    assert all(m.op == "math" for m in net.modules() if isinstance(m, scm_nn.Attention))
    assert torch.allclose(net(x, t), y_sdpa, atol=1e-5)
    with pytest.raises(ValueError, match="attention op must be one of math, sdpa"):
        scm_nn.set_attention_op(net, "flash")


def test_time_embedding_stays_float32_under_autocast():
    cond = scm_nn.Conditioning(16, 32, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cond.mlp(cond.pos(torch.rand(3))).dtype == torch.bfloat16  # unmarked, autocast would apply
        assert cond(torch.rand(3), None).dtype == torch.float32  # the marked float32 region


def test_amp_dtype_autocasts_only_the_backbone_of_a_plain_float32_forward():
    """The one place that autocasts: a plain float32 forward's backbone. The time embedding, tangent calls and
    float64 inputs (the finite-difference oracle) keep their precision."""
    net = small_unet()
    x, t = torch.randn(2, 4, 6, 6), torch.rand(2)
    ref = net(x, t)
    net.amp_dtype = torch.bfloat16
    out = net(x, t)
    assert ref.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.05 * ref.abs().max().item())
    assert net.cond(t, None).dtype == torch.float32
    F, J = torch.func.jvp(net, (x, t), (torch.randn_like(x), torch.ones_like(t)))
    assert F.dtype == J.dtype == torch.float32 and torch.equal(F, ref)
    assert net.double()(x.double(), t.double()).dtype == torch.float64
    net.amp_dtype = None
    assert torch.equal(net.float()(x, t), ref)


def test_pnorm_has_unit_rms_over_channels():
    a = torch.randn(5, 32) * 7
    assert torch.allclose(scm_nn.pnorm(a).square().mean(dim=1), torch.ones(5), atol=1e-5)


def test_class_conditioning_changes_output_and_null_label_is_default():
    net = small_unet(num_classes=10)
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    y0, y1 = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
    assert not torch.allclose(y0, y1)
    assert torch.equal(net(x, t), net(x, t, torch.tensor([10, 10])))


def test_adaptive_weight_starts_at_zero():
    assert torch.equal(scm_nn.AdaptiveWeight()(torch.rand(4)), torch.zeros(4))


def test_scales_parameter_counts_are_ordered_and_paper_sized():
    from scm import networks

    counts = {s: networks.scale_param_count(s) for s in scm_nn.SCALES}
    assert counts["cpu-xs"] < counts["cpu-s"] < counts["cpu-m"] < counts["cpu-l"]
    assert counts["S"] < counts["M"] < counts["L"] < counts["XL"] < counts["XXL"]
    # The paper's scales are EDM2's U-Net with sCM's double normalisation (tests/scm/test_mpunet.py: its counts).
    assert {networks.SCALES[s].network for s in ("S", "M", "L", "XL", "XXL")} == {"mpunet"}
    assert networks.SCALES["ddpmpp"].network == "ddpmpp"
    assert scm_nn.count_params(scm_nn.UNet(scm_nn.unet_config("cpu-s", in_channels=4))) == counts["cpu-s"]
    with pytest.raises(ValueError, match="scale 'S' is a mpunet network"):
        scm_nn.unet_config("S", in_channels=4)


def test_unknown_scale_and_bad_configs():
    with pytest.raises(ValueError, match=r"unknown scale 'huge' \(accepted: cpu-xs, cpu-s"):
        scm_nn.unet_config("huge", in_channels=4)
    with pytest.raises(ValueError, match="dropout"):
        scm_nn.UNet(scm_nn.UNetConfig(dropout=1.5))
    with pytest.raises(ValueError, match="divisible"):
        scm_nn.UNet(scm_nn.UNetConfig(model_channels=12, groups=8))


# ---------------------------------------------------------------------------------------------------------------
# The forward-mode fast path (scm.nn "Forward-mode fast path"): UNet/MLP called with dual inputs.


def _jvp64(fn, primals, tangents):
    with torch.no_grad():
        return torch.func.jvp(fn, primals, tangents)


@pytest.mark.parametrize("m, shape", [
    (torch.nn.GroupNorm(4, 8), (3, 8, 5, 5)), (torch.nn.GroupNorm(4, 8, affine=False), (3, 8, 5, 5)),
    (torch.nn.GroupNorm(2, 8), (3, 8)), (torch.nn.Conv2d(8, 6, 3, padding=1), (3, 8, 5, 5)),
    (torch.nn.Conv2d(8, 6, 3, stride=2), (3, 8, 7, 7)), (torch.nn.Linear(8, 5), (3, 8)),
    (torch.nn.AvgPool2d(2), (3, 8, 6, 6)), (torch.nn.Upsample(scale_factor=2.0), (3, 8, 3, 3)),
], ids=["gn", "gn-noaffine", "gn-2d", "conv", "conv-stride", "linear", "avgpool", "upsample"])
def test_layer_jvp_rules_match_autograd_forward_ad(m, shape):
    m = m.double()
    if isinstance(m, torch.nn.GroupNorm) and m.affine:  # non-trivial γ, β
        torch.nn.init.normal_(m.weight), torch.nn.init.normal_(m.bias)
    x, x_t = torch.randn(shape, dtype=torch.float64) + 0.3, torch.randn(shape, dtype=torch.float64)
    rule = scm_nn._group_norm_jvp if isinstance(m, torch.nn.GroupNorm) else scm_nn._affine_jvp
    y, y_t = rule(m, x, x_t)
    y_ref, y_t_ref = _jvp64(m, (x,), (x_t,))
    assert torch.equal(y, y_ref)
    assert torch.allclose(y_t, y_t_ref, atol=1e-12), (y_t - y_t_ref).abs().max()


def test_pointwise_jvp_rules_match_autograd_forward_ad():
    a, a_t = torch.randn(5, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    for rule, fn in ((scm_nn._pnorm_jvp, scm_nn.pnorm), (scm_nn._silu_jvp, torch.nn.functional.silu)):
        y, y_t = rule(a, a_t)
        y_ref, y_t_ref = _jvp64(fn, (a,), (a_t,))
        assert torch.equal(y, y_ref) and torch.allclose(y_t, y_t_ref, atol=1e-12)
    emb = scm_nn.PositionalEmbedding(16)
    t, t_t = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    (y, y_t), (y_ref, y_t_ref) = emb._jvp(t, t_t), _jvp64(emb, (t,), (t_t,))
    assert torch.equal(y, y_ref) and torch.allclose(y_t, y_t_ref, atol=1e-12)
    with pytest.raises(TypeError, match="no forward-mode rule for MaxPool2d"):
        scm_nn._affine_jvp(torch.nn.MaxPool2d(2), a, a_t)


def test_block_jvp_rules_match_autograd_forward_ad():
    x, x_t = torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 16, 6, 6, dtype=torch.float64)
    e, e_t = torch.randn(2, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    attn = scm_nn.Attention(16, num_heads=2, groups=4).double()
    block = scm_nn.ResBlock(16, 8, 32, dropout=0.0, groups=4, attention=True, num_heads=2).double()
    for m, primals, tangents in ((attn, (x,), (x_t,)), (block, (x, e), (x_t, e_t))):
        y, y_t = m._jvp(*(a for pair in zip(primals, tangents) for a in pair))
        y_ref, y_t_ref = _jvp64(m, primals, tangents)
        assert torch.equal(y, y_ref)
        assert torch.allclose(y_t, y_t_ref, atol=1e-12), (type(m).__name__, (y_t - y_t_ref).abs().max())


def _unet_dropout_labels():
    return small_unet(dropout=0.3, num_classes=10).train()


@pytest.mark.parametrize("make, shape, labels", [
    (small_unet, (3, 4, 7, 7), None), (_unet_dropout_labels, (3, 4, 8, 8), torch.tensor([1, 2, 10])),
    (lambda: scm_nn.MLP(scm_nn.MLPConfig(dim=3, width=32, dropout=0.2, num_classes=4)).train(), (3, 3),
     torch.tensor([0, 3, 4])),
], ids=["unet", "unet-dropout-labels", "mlp-dropout-labels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_jvp_matches_generic_forward_ad_and_plain_forward(make, shape, labels, dtype, monkeypatch):
    """Same F⁻ as the plain forward (bitwise, dropout masks included) and the same J as generic forward AD."""
    net = make().to(dtype)
    x_t, dxt_dt = 0.5 * torch.randn(shape, dtype=dtype), 0.5 * torch.randn(shape, dtype=dtype)
    t = torch.tensor([0.05, 0.8, 1.55], dtype=dtype)
    calls = []
    monkeypatch.setattr(type(net), "_jvp", lambda self, *a, f=type(net)._jvp: calls.append(1) or f(self, *a))
    torch.manual_seed(1)
    F_fast, J_fast = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels)
    assert calls, "the fast path was not taken"
    torch.manual_seed(1)
    with torch.no_grad():
        F_plain = net(x_t / 0.5, t, labels)
    monkeypatch.setattr(net, "fast_jvp", False)
    torch.manual_seed(1)
    F_ref, J_ref = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels)
    assert len(calls) == 1
    assert torch.equal(F_fast, F_plain) and torch.equal(F_ref, F_plain)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(J_fast, J_ref, atol=tol, rtol=tol), (J_fast - J_ref).abs().max()
    assert J_ref.abs().max() > 1e-2


def test_fast_jvp_through_forward_ad_api_and_single_dual_input():
    net = small_unet().double()
    x, x_t = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    t, t_t = torch.rand(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    _, J = _jvp64(net, (x, t), (x_t, t_t))
    _, J_x = _jvp64(lambda a: net(a, t), (x,), (x_t,))
    _, J_t = _jvp64(lambda b: net(x, b), (t,), (t_t,))
    with torch.no_grad(), fwAD.dual_level():
        J_fw = fwAD.unpack_dual(net(fwAD.make_dual(x, x_t), fwAD.make_dual(t, t_t))).tangent
    assert torch.allclose(J_fw, J, atol=1e-13)
    assert torch.allclose(J_x + J_t, J, atol=1e-12)


def test_fast_jvp_falls_back_when_parameters_carry_tangents(monkeypatch):
    """A JVP in parameter space (functional_call with dual parameters) must not take the input-only fast path."""
    net = small_unet().double()
    x, t = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    params = {k: v.detach() for k, v in net.named_parameters()}
    p_t = {k: torch.randn_like(v) for k, v in params.items()}
    fn = lambda p: torch.func.functional_call(net, p, (x, t))
    _, J = _jvp64(fn, (params,), (p_t,))
    monkeypatch.setattr(net, "fast_jvp", False)
    _, J_ref = _jvp64(fn, (params,), (p_t,))
    assert torch.allclose(J, J_ref, atol=1e-12) and J_ref.abs().max() > 1e-3


def test_fast_jvp_outputs_are_differentiable(monkeypatch):
    """JVP under grad mode: gradients through F⁻ equal generic forward AD's; those through J (which generic forward
    AD cannot give: silu_backward has no derivative) pass gradcheck in the input and in a weight."""
    net = scm_nn.MLP(scm_nn.MLPConfig(dim=3, width=8, depth=2, groups=4)).double()
    x, x_t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t, t_t = torch.rand(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def grads():
        F, _ = torch.func.jvp(net, (x, t), (x_t, t_t))
        return torch.autograd.grad(F.square().sum(), list(net.parameters()))

    fast = grads()
    monkeypatch.setattr(net, "fast_jvp", False)
    for a, b in zip(fast, grads()):
        assert torch.allclose(a, b, atol=1e-12)
    monkeypatch.setattr(net, "fast_jvp", True)
    params = dict(net.named_parameters())
    F_of = lambda w: lambda a, b: torch.func.functional_call(net, {**params, "blocks.0.linear.weight": w}, (a, b))
    J_of = lambda w: torch.func.jvp(F_of(w), (x, t), (x_t, t_t))[1]
    assert torch.autograd.gradcheck(J_of, (params["blocks.0.linear.weight"].detach().clone().requires_grad_(),),
                                    fast_mode=True)
    assert torch.autograd.gradcheck(lambda a: torch.func.jvp(net, (a, t), (x_t, t_t))[1], (x.clone().requires_grad_(),),
                                    fast_mode=True)


def test_fast_jvp_under_cpu_autocast_bfloat16():
    """Under autocast, F⁻ is the autocast forward itself and J is the float32 tangent to bfloat16 precision."""
    net = small_unet().train()
    x_t, dxt_dt, t = 0.5 * torch.randn(3, 4, 7, 7), 0.5 * torch.randn(3, 4, 7, 7), torch.tensor([0.05, 0.8, 1.55])
    _, J32 = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F, J = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5)
        with torch.no_grad():
            F_plain = net(x_t / 0.5, t)
    assert F.dtype == J.dtype == F_plain.dtype == torch.bfloat16
    assert torch.equal(F, F_plain)
    assert (J.float() - J32).abs().max() < 0.03 * J32.abs().max()


@pytest.mark.parametrize("make", [lambda: small_unet(num_classes=3, guidance_embedding=True),
                                  lambda: scm_nn.MLP(scm_nn.MLPConfig(dim=3, num_classes=3, guidance_embedding=True))],
                         ids=["unet", "mlp"])
def test_guidance_embedding_starts_at_zero_and_its_tangent_is_exact(make):
    """The guidance scale s enters like the label (zero-initialised, so a student copied from its teacher starts as
    the teacher at every s); the fast tangent path carries it and matches the float64 finite difference."""
    torch.manual_seed(0)
    net = make().double()
    shape = (3, 4, 7, 7) if isinstance(net, scm_nn.UNet) else (3, 3)
    x, t, y = torch.randn(shape, dtype=torch.float64), torch.tensor([0.1, 0.7, 1.4], dtype=torch.float64), torch.tensor([0, 2, 3])
    s = torch.tensor([1.0, 1.5, 2.0], dtype=torch.float64)
    assert torch.equal(net(x, t, y, guidance=s), net(x, t, y))
    with torch.no_grad():
        net.cond.guidance[1].weight.normal_(0, 0.5)
    assert not torch.allclose(net(x, t, y, guidance=s), net(x, t, y))
    dxt_dt = torch.randn_like(x)
    F1, J1 = jvp_tangent(net, x, t, dxt_dt, sigma_data=0.5, class_labels=y, guidance=s)
    F2, J2 = fd_tangent(net, x, t, dxt_dt, sigma_data=0.5, class_labels=y, guidance=s, h=1e-5)
    assert torch.allclose(F1, F2, atol=1e-12) and torch.allclose(J1, J2, atol=1e-7, rtol=1e-6)
    net.fast_jvp = False
    _, J3 = jvp_tangent(net, x, t, dxt_dt, sigma_data=0.5, class_labels=y, guidance=s)
    assert torch.allclose(J1, J3, atol=1e-10)


def test_guided_velocity_is_classifier_free_guidance():
    from scm.trigflow import guided_velocity

    v_c, v_u = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.allclose(guided_velocity(v_c, v_u, 1.0), v_c, atol=1e-6)
    assert torch.allclose(guided_velocity(v_c, v_u, torch.tensor([0.0, 1.0, 2.0, 3.0])),
                          v_u + torch.tensor([0.0, 1.0, 2.0, 3.0])[:, None] * (v_c - v_u))
