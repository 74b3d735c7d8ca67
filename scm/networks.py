"""The network a scale names (:data:`scm.scales.SCALES`), and networks rebuilt from the plain config a model file holds.

Three families, all called ``net(x_hat, t, class_labels)`` and returning F_θ:

- ``unet``: :class:`scm.nn.UNet`, this project's GroupNorm U-Net with a hand-written tangent path (the CPU scales);
- ``mpunet``: :class:`scm.mpunet.MPUNet`, EDM2's magnitude-preserving U-Net (the paper's ImageNet scales S … XXL);
- ``ddpmpp``: :class:`scm.ddpmpp.DDPMpp`, EDM's DDPM++ (the paper's CIFAR-10 network).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from scm.ddpmpp import DDPMpp, DDPMppConfig
from scm.mpunet import MPUNet, MPUNetConfig
from scm.nn import UNet, UNetConfig, count_params
from scm.scales import SCALES

NETWORKS: dict[str, tuple[type[nn.Module], type]] = {
    "unet": (UNet, UNetConfig),
    "mpunet": (MPUNet, MPUNetConfig),
    "ddpmpp": (DDPMpp, DDPMppConfig),
}


def network_config(scale: str, *, in_channels: int, dropout: float = 0.0, dropout_levels: tuple[int, ...] = (),
                   num_classes: int = 0, model_channels: int = 0) -> Any:
    """The config of ``scale``'s network; ``model_channels`` > 0 replaces the scale's base width (rehearsals).
    ``dropout_levels`` (EDM2's U-Net only; () = every level) restricts dropout to those levels."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} (accepted: {', '.join(SCALES)})")
    s = SCALES[scale]
    shape = dict(in_channels=in_channels, model_channels=model_channels or s.model_channels,
                 channel_mult=s.channel_mult, num_blocks=s.num_blocks, attn_levels=s.attn_levels, dropout=dropout,
                 num_classes=num_classes)
    if dropout_levels and s.network != "mpunet":
        raise ValueError(f"dropout at chosen levels needs EDM2's U-Net; scale {scale!r} is a {s.network} network, "
                         "which drops out everywhere")
    if s.network == "unet":
        return UNetConfig(**shape, num_heads=s.num_heads, groups=8)
    if s.network == "mpunet":
        return MPUNetConfig(**shape, dropout_levels=tuple(dropout_levels) or None)
    return DDPMppConfig(**shape)


def set_dropout(net: nn.Module, p: float, levels: tuple[int, ...] = ()) -> None:
    """Set the dropout rate of ``net`` to ``p``: everywhere, or only at ``levels`` (EDM2's U-Net only).

    The training stages call this to give a student other dropout than its teacher (sCT: 25–45 % at resolutions
    ≤ 16² on ImageNet). A network's blocks are named ``l<level>_...`` in :class:`scm.mpunet.MPUNet`.
    """
    if levels and not isinstance(net, MPUNet):
        raise ValueError(f"dropout at chosen levels needs EDM2's U-Net; this {kind_of(net)} network drops out everywhere")
    if isinstance(net, MPUNet):
        bad = [i for i in levels if not 0 <= i < len(net.cfg.channel_mult)]
        if bad:
            raise ValueError(f"level {bad[0]} does not exist (the network has levels 0..{len(net.cfg.channel_mult) - 1})")
        for name, block in [*net.enc.items(), *net.dec.items()]:
            level = int(name[1:].split("_")[0])
            if hasattr(block, "dropout"):
                block.dropout.p = p if not levels or level in levels else 0.0
        return
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = p


def num_classes(net: nn.Module) -> int:
    """The number of classes a network is conditioned on (0: unconditional)."""
    return int(getattr(getattr(net, "cfg", None), "num_classes", 0))


def has_guidance_embedding(net: nn.Module) -> bool:
    """Whether ``net`` takes sCD's guidance scale s (``net(x_hat, t, labels, guidance=s)``)."""
    return bool(getattr(getattr(net, "cfg", None), "guidance_embedding", False))


def with_guidance_embedding(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with a guidance embedding: the same weights, plus the embedding of s, which starts at zero
    (so the copy computes ``net``'s function at every s). An sCD student of a guided teacher starts here."""
    if not hasattr(net.cfg, "guidance_embedding"):
        raise ValueError(f"a {kind_of(net)} network has no guidance embedding (the networks with one: unet, mpunet)")
    first = next(net.parameters())
    new = build(dataclasses.replace(net.cfg, guidance_embedding=True)).to(device=first.device, dtype=first.dtype)
    missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
    if unexpected or not all("guidance" in k for k in missing):
        raise ValueError(f"guidance embedding: unexpected keys {unexpected} / missing {missing}")
    return new


def kind_of(net: nn.Module) -> str:
    """The family name of ``net`` (a key of :data:`NETWORKS`)."""
    for kind, (cls, _) in NETWORKS.items():
        if type(net) is cls:
            return kind
    raise TypeError(f"{type(net).__name__} is not one of the project's networks")


def build(config: Any) -> nn.Module:
    """The network of a config from :func:`network_config` (or :func:`from_plain`)."""
    for cls, cfg_cls in NETWORKS.values():
        if type(config) is cfg_cls:
            return cls(config)
    raise TypeError(f"{type(config).__name__} is not a network config")


def to_plain(net: nn.Module) -> dict[str, Any]:
    """``{"kind": ..., "config": {...}}``: JSON-able, enough for :func:`from_plain` to rebuild the network."""
    return {"kind": kind_of(net), "config": dataclasses.asdict(net.cfg)}


def from_plain(kind: str, config: dict[str, Any]) -> Any:
    """The config object described by :func:`to_plain`'s output (lists become tuples; unknown keys raise)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r} (accepted: {', '.join(NETWORKS)})")
    cfg_cls = NETWORKS[kind][1]
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def scale_param_count(scale: str, in_channels: int = 4, num_classes: int = 0) -> int:
    """Parameter count of a scale's network, built on the meta device (no memory, so XXL is cheap to count)."""
    import torch

    with torch.device("meta"):
        return count_params(build(network_config(scale, in_channels=in_channels, num_classes=num_classes)))
