"""DDPM++ (EDM's CIFAR-10 network): parameter count, the sCM tangent against a float64 finite difference, conditioning
and augmentation labels, attention ops, and one real training step."""

import pytest
import torch

from scm.ddpmpp import DDPMpp, DDPMppConfig, SongBlock
from scm.losses import SCMConfig, fd_tangent, jvp_tangent, scm_loss
from scm.nn import attention_op, count_params


def tiny(**kw) -> DDPMpp:
    cfg = dict(in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_levels=(1,), dropout=0.0)
    cfg.update(kw)
    return DDPMpp(DDPMppConfig(**cfg))


def test_parameter_count_is_edms_cifar10_network():
    with torch.device("meta"):
        edm = DDPMpp(DDPMppConfig(double_norm=False, augment_dim=9))  # EDM's CIFAR-10 DDPM++ (train.py --arch=ddpmpp)
        scm = DDPMpp(DDPMppConfig(double_norm=True, augment_dim=9))
    assert abs(count_params(edm) / 55.73e6 - 1) < 0.001, count_params(edm)  # EDM reports 55.7 M ("56 M")
    # The adaptive double normalisation gives each block's embedding projection a scale half (and its bias).
    blocks = [m for m in scm.modules() if isinstance(m, SongBlock)]
    added = sum(b.affine.out_features // 2 * (b.affine.in_features + 1) for b in blocks)
    assert count_params(scm) - count_params(edm) == added
    assert abs(count_params(scm) / 60.07e6 - 1) < 0.001


@pytest.mark.parametrize("double_norm", [True, False])
def test_jvp_matches_float64_finite_difference(double_norm):
    torch.manual_seed(0)
    net = tiny(num_classes=3, augment_dim=9, double_norm=double_norm).double()
    with torch.no_grad():  # EDM initialises the last layers near zero; make every path count
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
    x_t = 0.5 * torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.05, 0.8, 1.55], dtype=torch.float64)
    dxt_dt = 0.5 * torch.randn_like(x_t)
    labels = torch.tensor([0, 2, 3])
    F1, J1 = jvp_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels)
    F2, J2 = fd_tangent(net, x_t, t, dxt_dt, sigma_data=0.5, class_labels=labels, h=1e-5)
    assert torch.allclose(F1, F2, atol=1e-12)
    assert torch.allclose(J1, J2, atol=1e-7, rtol=1e-6), (J1 - J2).abs().max()
    assert J1.abs().max() > 1e-3


def test_labels_augmentation_and_attention_ops():
    torch.manual_seed(0)
    net = tiny(num_classes=4, augment_dim=9)
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert torch.equal(net(x, t, torch.tensor([4, 4])), net(x, t))  # index num_classes = no label = None
    assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1])))
    assert torch.equal(net(x, t, augment_labels=torch.zeros(2, 9)), net(x, t))
    assert not torch.allclose(net(x, t, augment_labels=torch.ones(2, 9)), net(x, t))
    with attention_op(net, "sdpa"):
        y = net(x, t)
    assert torch.allclose(y, net(x, t), atol=1e-5)


def test_a_training_step_changes_every_layer():
    torch.manual_seed(0)
    net = tiny(dropout=0.2).train()
    opt = torch.optim.RAdam(net.parameters(), lr=1e-3)
    out = scm_loss(net, torch.randn(4, 3, 8, 8), cfg=SCMConfig(sigma_data=0.5, tangent_warmup_steps=0), step=0)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters())
    opt.step()


def test_bad_configs():
    for kw, match in [(dict(num_blocks=0), "num_blocks must be >= 1"), (dict(attn_levels=(3,)), "attn_levels must index"),
                      (dict(model_channels=2), "every width must be >= 4"), (dict(dropout=-0.1), "dropout must be in")]:
        with pytest.raises(ValueError, match=match):
            DDPMpp(DDPMppConfig(**kw))
