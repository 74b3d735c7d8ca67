"""On CUDA (skipped without a GPU): the fast JVP path agrees with generic forward AD, and bf16 autocast touches only
the grad-enabled forward of the sCM loss (g, ‖g‖ and the loss value stay the float32 ones)."""

import pytest
import torch

from scm import losses
from scm import nn as scm_nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SD = 0.5


def _net():
    torch.manual_seed(0)
    return scm_nn.UNet(scm_nn.UNetConfig(in_channels=4, model_channels=32, channel_mult=(1, 2), num_blocks=1,
                                   attn_levels=(1,), num_heads=2)).cuda()


def test_fast_jvp_matches_generic_forward_ad_on_cuda(monkeypatch):
    net = _net()
    g = torch.Generator(device="cuda").manual_seed(1)
    x_t = SD * torch.randn(4, 4, 8, 8, device="cuda", generator=g)
    t = torch.linspace(0.1, 1.5, 4, device="cuda")
    dxt_dt = SD * torch.randn(4, 4, 8, 8, device="cuda", generator=g)
    F_fast, J_fast = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    monkeypatch.setattr(net, "fast_jvp", False)
    F_ref, J_ref = losses.jvp_tangent(net, x_t, t, dxt_dt, sigma_data=SD)
    torch.testing.assert_close(F_fast, F_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(J_fast, J_ref, rtol=1e-3, atol=1e-4)


def test_bf16_autocast_on_cuda_touches_only_the_grad_forward():
    x0 = SD * torch.randn(16, 4, 8, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    noise = losses.Noise.draw(tuple(x0.shape), generator=torch.Generator(device="cuda").manual_seed(7), device="cuda")
    cfg = losses.SCMConfig(sigma_data=SD, tangent_warmup_steps=0)
    teacher = _net().eval().requires_grad_(False)
    from scm.trigflow import velocity

    def run(amp):
        net = _net()
        net.amp_dtype = amp
        out = losses.scm_loss(net, x0, cfg=cfg, step=0, noise=noise,
                         teacher=lambda x, t: velocity(teacher, x, t, SD))
        out.loss.backward()
        return out, torch.cat([p.grad.flatten() for p in net.parameters()])

    (ref, g_ref), (amp, g_amp) = run(None), run(torch.bfloat16)
    assert amp.loss.dtype == torch.float32
    assert torch.equal(ref.loss, amp.loss) and ref.stats["g_norm"] == amp.stats["g_norm"]
    assert not torch.equal(g_ref, g_amp)
    assert torch.nn.functional.cosine_similarity(g_ref, g_amp, dim=0) > 0.98
