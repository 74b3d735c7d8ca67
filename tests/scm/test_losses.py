"""The sCM objective: tangent, g at both ends of the warmup, normalisation, adaptive weighting, robustness."""

import math

import pytest
import torch

from scm import losses
from scm import nn as scm_nn
from scm import trigflow

SD = 0.5


def _net(dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    return scm_nn.UNet(scm_nn.UNetConfig(in_channels=2, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                   attn_levels=(1,), num_heads=2, dropout=dropout)).to(dtype)


def _point(n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x_t = SD * torch.randn(n, 2, 6, 6, generator=g, dtype=dtype)
    t = torch.linspace(0.1, 1.5, n, dtype=dtype)
    dxt_dt = SD * torch.randn(n, 2, 6, 6, generator=g, dtype=dtype)
    return x_t, t, dxt_dt


def test_g_at_r0_is_weighted_velocity_matching():
    net = _net()
    x_t, t, dxt_dt = _point()
    F_minus, J = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    g = losses.scm_g(F_minus, J, x_t, t, dxt_dt, sigma_data=SD, r=0.0)
    c2 = trigflow.append_dims(torch.cos(t) ** 2, 4)
    assert torch.allclose(g, -c2 * (SD * F_minus - dxt_dt), atol=1e-14)


def test_g_at_r1_is_cos_t_times_total_derivative_of_f():
    """g(r=1) = cos t·df⁻/dt with df⁻/dt along dx_t/dt from an independent central difference of f itself."""
    net = _net()
    x_t, t, dxt_dt = _point()
    F_minus, J = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    g = losses.scm_g(F_minus, J, x_t, t, dxt_dt, sigma_data=SD, r=1.0)

    def f(x, s):
        with torch.no_grad():
            return trigflow.consistency_fn(x, s, trigflow.velocity(net, x, s, SD))

    h = 1e-5
    df_dt = (f(x_t + h * dxt_dt, t + h) - f(x_t - h * dxt_dt, t - h)) / (2 * h)
    assert torch.allclose(g, trigflow.append_dims(torch.cos(t), 4) * df_dt, atol=1e-7)


def test_printed_tangent_convention_would_double_sigma_data():
    """The printed (…, cos t sin t·σ_d) tangent returns σ_d× ours: the slip docs/method.md ("The tangent") documents."""
    net = _net()
    x_t, t, dxt_dt = _point()
    _, J = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    cs = torch.cos(t) * torch.sin(t)
    with torch.no_grad():
        _, J_printed = torch.func.jvp(lambda a, b: net(a, b), (x_t / SD, t), (trigflow.append_dims(cs, 4) * dxt_dt, cs * SD))
    assert torch.allclose(J_printed, SD * J, atol=1e-10)


@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_tangent_normalisation(norm):
    g = torch.randn(5, 3, 4, 4) * torch.tensor([1e-3, 1e-1, 1, 10, 1e4]).reshape(5, 1, 1, 1)
    out = losses.normalize_tangent(g, c=0.1, norm=norm)
    n = g.flatten(1).norm(dim=1) / (1 if norm == "l2" else math.sqrt(48))
    expected = g / (n + 0.1).reshape(5, 1, 1, 1)
    assert torch.allclose(out, expected)
    out_n = out.flatten(1).norm(dim=1) / (1 if norm == "l2" else math.sqrt(48))
    assert (out_n < 1).all() and out_n[-1] > 0.999  # bounded, and ≈ unit for large g
    assert torch.equal(losses.normalize_tangent(g, norm="clip"), g.clamp(-1, 1))
    with pytest.raises(ValueError, match="tangent norm must be one of"):
        losses.normalize_tangent(g, norm="linf")


def test_tangent_warmup():
    assert [losses.tangent_warmup(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert losses.tangent_warmup(0, 0) == 1.0


def test_adaptive_weight_optimum_equalises_the_loss():
    """Fitting w_φ on errors whose size depends on t makes e^{w(t)}·E[err²] ≈ 1 in every t bucket (paper App. D)."""
    torch.manual_seed(0)
    head = scm_nn.AdaptiveWeight()
    opt = torch.optim.Adam(head.parameters(), lr=2e-2)
    scale = lambda t: 0.01 + 2.0 * torch.sin(t) ** 2  # E[err²](t) spans 200x
    for step in range(800):
        t = torch.rand(512) * 1.5 + 0.02
        # Noisy per-sample errors with mean scale(t) first; then the exact mean, so Adam's noise settles.
        sq_err = scale(t) * torch.distributions.Exponential(1.0).sample((512,)) if step < 500 else scale(t)
        loss = losses.adaptive_weighted(sq_err, head(t)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = torch.linspace(0.05, 1.5, 8)
    with torch.no_grad():
        ratio = torch.exp(head(t)) * scale(t)
    assert torch.allclose(ratio, torch.ones(8), atol=0.1), ratio


def _loss(net, x0, tangent="jvp", teacher=None, step=10**6, **kw):
    cfg = losses.SCMConfig(sigma_data=SD, tangent=tangent, tangent_warmup_steps=100, **kw)
    return losses.scm_loss(net, x0, cfg=cfg, step=step, teacher=teacher, generator=torch.Generator().manual_seed(5))


def test_scm_loss_value_is_mean_squared_normalised_tangent_and_jvp_equals_fd():
    """Without adaptive weighting, the loss value is mean‖g/(‖g‖+c)‖²/D; FD and JVP tangents give the same loss."""
    net = _net()
    x0 = SD * torch.randn(6, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = _loss(net, x0)
    out_fd = _loss(net, x0, tangent="fd")
    assert out.loss.item() == pytest.approx(out_fd.loss.item(), rel=1e-6)
    # Recompute by hand with the same random draws (t, then z, from the same generator).
    g_ = torch.Generator().manual_seed(5)
    t = trigflow.t_from_normal(torch.randn(6, generator=g_), -1.0, 1.4, SD).double()
    z = SD * torch.randn(x0.shape, generator=g_, dtype=x0.dtype)
    x_t = trigflow.add_noise(x0, z, t)
    dxt_dt = trigflow.velocity_target(x0, z, t)  # sCT
    F_minus, J = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    g = losses.normalize_tangent(losses.scm_g(F_minus, J, x_t, t, dxt_dt, sigma_data=SD, r=1.0))
    assert out.loss.item() == pytest.approx(g.pow(2).flatten(1).mean(1).mean().item(), rel=1e-6)


def test_gradient_moves_F_along_g():
    """∂L/∂F = −2g/D per sample: a descent step moves F along +g (paper §4.2)."""
    net = _net()
    x0 = SD * torch.randn(3, 2, 6, 6, dtype=torch.float64)
    outputs = {}
    handle = net.register_forward_hook(lambda m, i, o: outputs.__setitem__("F", o) if torch.is_grad_enabled() else None)
    out = _loss(net, x0)
    handle.remove()
    F = outputs["F"]
    (grad_F,) = torch.autograd.grad(out.loss, F)
    # Rebuild g exactly as the loss did, then compare: grad_F = −2g/(D·N).
    g_ = torch.Generator().manual_seed(5)
    t = trigflow.t_from_normal(torch.randn(3, generator=g_), -1.0, 1.4, SD).double()
    z = SD * torch.randn(x0.shape, generator=g_, dtype=x0.dtype)
    x_t, dxt_dt = trigflow.add_noise(x0, z, t), trigflow.velocity_target(x0, z, t)
    F_minus, J = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    g = losses.normalize_tangent(losses.scm_g(F_minus, J, x_t, t, dxt_dt, sigma_data=SD, r=1.0))
    assert torch.allclose(grad_F, -2 * g / (g[0].numel() * 3), atol=1e-12)


def test_scd_uses_the_teacher_velocity():
    """With a teacher, dx_t/dt is the teacher's output: at r = 0, g is −cos²t(σ_d F⁻ − teacher) and nothing else."""
    net = _net()
    x0 = SD * torch.randn(3, 2, 6, 6, dtype=torch.float64)
    teacher_out = {}

    def teacher(x_t, t):
        teacher_out["v"] = 0.3 * torch.ones_like(x_t)
        teacher_out["x_t"], teacher_out["t"] = x_t, t
        return teacher_out["v"]

    out = _loss(net, x0, teacher=teacher, step=0)  # r = 0
    F_minus, _ = losses.jvp_tangent(net, teacher_out["x_t"], teacher_out["t"], teacher_out["v"], sigma_data=SD)
    c2 = trigflow.append_dims(torch.cos(teacher_out["t"]) ** 2, 4)
    g = losses.normalize_tangent(-c2 * (SD * F_minus - teacher_out["v"]))
    assert out.loss.item() == pytest.approx(g.pow(2).flatten(1).mean(1).mean().item(), rel=1e-6)
    assert out.stats["r"] == 0.0


def test_nonfinite_samples_are_masked_and_counted():
    net = _net(dtype=torch.float32)
    x0 = SD * torch.randn(4, 2, 6, 6)

    def bad_teacher(x_t, t):
        v = torch.zeros_like(x_t)
        v[1] = float("nan")
        return v

    out = _loss(net, x0, teacher=bad_teacher)
    assert out.stats["nonfinite"] == 1 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_optimizer_step_skips_nonfinite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    norm, stepped = losses.optimizer_step((p * float("inf")).sum(), [p], opt)
    assert not stepped and not math.isfinite(norm) and torch.equal(p.detach(), torch.ones(3))
    norm, stepped = losses.optimizer_step((p * 2).sum(), [p], opt)
    assert stepped and torch.allclose(p.detach(), torch.full((3,), 0.8))


def test_dropout_masks_are_shared_between_jvp_and_grad_pass():
    net = _net(dropout=0.5, dtype=torch.float32).train()
    x_t, t, dxt_dt = _point(dtype=torch.float32)
    state = losses._rng_state(x_t.device)
    F_minus, _ = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    losses._set_rng_state(x_t.device, state)
    assert torch.allclose(net(x_t / SD, t), F_minus, atol=1e-6)  # same masks
    assert not torch.allclose(net(x_t / SD, t), F_minus, atol=1e-3)  # a fresh draw differs


@pytest.mark.parametrize("bad, match", [
    (dict(sigma_data=0.0), "sigma_data must be"), (dict(P_std=0.0), "P_std must be > 0"),
    (dict(tangent_norm="l3"), "tangent_norm must be one of"), (dict(tangent="autodiff"), "tangent must be one of 'jvp', 'fd'"),
])
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        losses.SCMConfig(**bad).validate()


def test_nonfinite_data_is_rejected():
    with pytest.raises(ValueError, match="x0 contains non-finite"):
        _loss(_net(), torch.full((2, 2, 6, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="x0 contains non-finite"):
        losses.diffusion_loss(_net(), torch.full((2, 2, 6, 6), float("inf"), dtype=torch.float64), sigma_data=SD, P_mean=-1, P_std=1)


def test_diffusion_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    """For x0 ≡ 0 the exact TrigFlow velocity is cos t·z = x_t/tan t... so F = x̂/tan t gives zero loss."""

    class Exact(torch.nn.Module):
        def forward(self, x_hat, t, class_labels=None):
            return x_hat / torch.tan(t).reshape(-1, 1)

    out = losses.diffusion_loss(Exact(), torch.zeros(64, 3, dtype=torch.float64), sigma_data=SD, P_mean=-1, P_std=1.4,
                           generator=torch.Generator().manual_seed(0))
    assert out.loss.item() < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Given noise (data parallelism) and mixed precision.


@pytest.mark.parametrize("objective", ["diffusion", "scd"])
def test_given_noise_is_the_noise_the_loss_would_draw_and_slices_compose(objective):
    """Noise.draw from a generator = what the loss draws from it; halves of a batch with halves of its noise give the
    batch's loss (what every rank of a data-parallel run relies on)."""
    net = _net(dtype=torch.float32)
    x0 = SD * torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    teacher = lambda x_t, t: trigflow.velocity(net, x_t, t, SD)
    cfg = losses.SCMConfig(sigma_data=SD, tangent_warmup_steps=0)
    loss = (lambda x, **kw: losses.diffusion_loss(net, x, sigma_data=SD, P_mean=-0.8, P_std=1.6, **kw)) if objective == "diffusion" \
        else (lambda x, **kw: losses.scm_loss(net, x, cfg=cfg, step=0, teacher=teacher, **kw))
    drawn = loss(x0, generator=torch.Generator().manual_seed(7))
    noise = losses.Noise.draw(tuple(x0.shape), generator=torch.Generator().manual_seed(7))
    given = loss(x0, noise=noise)
    assert torch.equal(drawn.loss, given.loss) and torch.equal(drawn.t, given.t)
    halves = [loss(x0[s], noise=noise[s]).loss for s in (slice(0, 4), slice(4, 8))]
    assert torch.allclose((halves[0] + halves[1]) / 2, given.loss, rtol=1e-5)
    with pytest.raises(ValueError, match="noise of shape"):
        loss(x0[:4], noise=noise)


def test_time_embedding_and_loss_weight_stay_float32_under_autocast():
    net, head = _net(dtype=torch.float32), scm_nn.AdaptiveWeight()
    t = torch.linspace(0.1, 1.5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.cond(t, None).dtype == torch.float32
        assert head(t).dtype == torch.float32
        assert net(torch.randn(4, 2, 6, 6), t).dtype == torch.bfloat16  # the rest of the network does autocast


def test_bf16_autocast_touches_only_the_grad_forward():
    """With net.amp_dtype = bf16, the tangent (hence g, ‖g‖ and the loss value) is exactly the float32 one, even under an
    outer autocast; only the gradient, through the bf16 forward, changes (a little)."""
    x0 = SD * torch.randn(8, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    noise = losses.Noise.draw(tuple(x0.shape), generator=torch.Generator().manual_seed(7))
    cfg = losses.SCMConfig(sigma_data=SD, tangent_warmup_steps=0)  # sCT: no teacher call to autocast

    def run(amp, outer):
        net = _net(dtype=torch.float32)
        net.amp_dtype = amp
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
            out = losses.scm_loss(net, x0, cfg=cfg, step=0, noise=noise)
        out.loss.backward()
        return out, torch.cat([p.grad.flatten() for p in net.parameters()])

    (ref, g_ref), (amp, g_amp), (outer, _) = run(None, False), run(torch.bfloat16, False), run(torch.bfloat16, True)
    assert amp.loss.dtype == torch.float32
    assert torch.equal(ref.loss, amp.loss) and ref.stats["g_norm"] == amp.stats["g_norm"] == outer.stats["g_norm"]
    assert not torch.equal(g_ref, g_amp)  # the forward really ran in bf16
    assert torch.nn.functional.cosine_similarity(g_ref, g_amp, dim=0) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# Class-conditional batches: label dropout and the guidance scale.


def test_conditional_noise_adds_c_after_the_rest():
    """A conditional draw gives an unconditional run's u and eps unchanged, then c ~ U[0, 1); slices keep it aligned."""
    plain = losses.Noise.draw((64, 2, 3), generator=torch.Generator().manual_seed(5))
    cond = losses.Noise.draw((64, 2, 3), generator=torch.Generator().manual_seed(5), conditional=True)
    assert plain.c is None and torch.equal(plain.u, cond.u) and torch.equal(plain.eps, cond.eps)
    assert cond.c.shape == (64,) and 0 <= cond.c.min() and cond.c.max() < 1
    assert torch.equal(cond[4:8].c, cond.c[4:8])


def test_label_dropout_and_guidance_scale():
    labels = torch.arange(10_000) % 7
    c = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    dropped = losses.drop_labels(labels, c, 0.1, num_classes=7)
    null = dropped == 7
    assert torch.equal(null, c < 0.1) and abs(null.float().mean().item() - 0.1) < 0.01
    assert torch.equal(dropped[~null], labels[~null])  # the others keep their label
    assert torch.equal(losses.drop_labels(labels, c, 0.0, 7), labels)
    s = losses.guidance_scale(c, 2.0)
    assert 1.0 <= s.min() and s.max() < 2.0 and abs(s.mean().item() - 1.5) < 0.01
    assert torch.equal(losses.guidance_scale(c, 1.0), torch.ones_like(c))


def test_guided_teacher_velocity_is_cfg_of_its_two_branches():
    net = scm_nn.UNet(scm_nn.UNetConfig(in_channels=2, model_channels=8, channel_mult=(1, 2), num_classes=3, groups=4))
    for p in net.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = SD * torch.randn(4, 2, 8, 8), torch.full((4,), 0.7), torch.tensor([0, 1, 2, 0])
    v_c, v_u = trigflow.velocity(net, x, t, SD, y), trigflow.velocity(net, x, t, SD, None)
    assert not torch.allclose(v_c, v_u)
    assert torch.equal(trigflow.guided_teacher_velocity(net, x, t, SD, y, 1.0), v_c)
    s = torch.tensor([1.0, 1.5, 2.0, 3.0])
    expected = v_u + s.view(4, 1, 1, 1) * (v_c - v_u)
    assert torch.allclose(trigflow.guided_teacher_velocity(net, x, t, SD, y, s), expected, atol=1e-6)
