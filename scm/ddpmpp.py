"""DDPM++ (Song et al. 2021, in EDM's reimplementation): the CIFAR-10 network of sCM (App. G, Table 4).

EDM's CIFAR-10 configuration is 128 base channels, multipliers (2, 2, 2), 4 residual blocks per resolution, one
attention head at 16², a 512-d embedding and dropout 0.13: 55.73 M parameters (tests/scm/test_ddpmpp.py). Layers are
initialised as EDM does (Xavier-uniform; the last layer of each residual branch and the output layer near zero).

sCM v2 §4.1 trains it in TrigFlow with three changes; the network itself sees two of them:

- the noise label is c_noise(t) = t; DDPM++ already uses a positional (sinusoidal) embedding, EDM's variant of it is
  kept as is (so a converted EDM checkpoint, whose caller passes c_noise = log(σ)/4, fits the same class);
- ``double_norm=True``: the embedding modulates each block as y = GN(h)⊙pnorm(s(emb)) + pnorm(b(emb)) (§4.1 (3));
  ``False`` is DDPM++'s own y = GN(h + b(emb)), which the ECT-matched sCT of App. E.3 ("without AdaGN") uses.
  The scale doubles each block's embedding projection: 60.07 M parameters instead of DDPM++'s 55.73 M (+7.8 %).

Called ``net(x_hat, t, class_labels=None, augment_labels=None)``; x̂ = x_t/σ_d. Class labels are integer indices
(index ``num_classes`` or ``None`` = no label). ``augment_labels`` are the 9 numbers that describe EDM's non-leaking
augmentation of each image (``augment_dim = 9``; ``None`` = not augmented). Forward-mode AD uses PyTorch's generic
rules (``fast_jvp = False``); attention goes through the pluggable op of :mod:`scm.nn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from scm.nn import ATTENTION_OPS, PluggableAttention, _backbone_autocast, float32_region, pnorm


def _init(layer: nn.Conv2d | nn.Linear, gain: float = 1.0) -> nn.Module:
    """EDM's Xavier-uniform initialisation scaled by ``gain``, for the weight and (with the same bound) the bias."""
    fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
    receptive = layer.weight[0, 0].numel()
    bound = math.sqrt(6 / (fan_in + fan_out * receptive)) * gain
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def _group_norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: 32 groups, at least 4 channels each, ε = 1e-6."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def _resample(x: Tensor, mode: str) -> Tensor:
    """EDM's [1, 1] resampling filter: exactly 2×2 average pooling, or nearest upsampling."""
    if mode == "down":
        return nnf.avg_pool2d(x, 2)
    if mode == "up":
        return nnf.interpolate(x, scale_factor=2.0, mode="nearest")
    return x


class EDMPositional(nn.Module):
    """EDM's positional embedding of the noise label: [sin, cos] of c·10000^(−k/(n/2 − 1)), k = 0 … n/2 − 1."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels, self.max_positions = num_channels, max_positions

    def forward(self, c: Tensor) -> Tensor:
        half = self.num_channels // 2
        dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
        freqs = (1 / self.max_positions) ** (torch.arange(half, device=c.device, dtype=dtype) / (half - 1))
        x = c.to(dtype).outer(freqs)
        return torch.cat([torch.sin(x), torch.cos(x)], dim=1)


class SongAttention(PluggableAttention):
    """DDPM++'s single-head self-attention on GN(x), added to x and scaled by √½."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = _init(nn.Conv2d(channels, channels * 3, 1), gain=math.sqrt(0.2))
        self.proj = _init(nn.Conv2d(channels, channels, 1), gain=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        q, k, v = (a.transpose(-1, -2)[:, None] for a in self.qkv(self.norm(x)).reshape(N, C, 3, H * W).unbind(2))
        y = ATTENTION_OPS[self.op](q, k, v)[:, 0].transpose(-1, -2)  # (N, C, HW)
        return (x + self.proj(y.reshape(N, C, H, W))) * math.sqrt(0.5)


class SongBlock(nn.Module):
    """GN-SiLU-conv (with resampling), modulation by emb, SiLU-dropout-conv, skip, √½; optional attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, resample: str = "keep",
                 attention: bool = False, dropout: float = 0.0, double_norm: bool = True):
        super().__init__()
        self.resample, self.double_norm = resample, double_norm
        self.norm0 = _group_norm(in_channels)
        self.conv0 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.affine = _init(nn.Linear(emb_channels, out_channels * (2 if double_norm else 1)))
        self.norm1 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), gain=1e-5)
        resampled = resample != "keep"
        self.skip = _init(nn.Conv2d(in_channels, out_channels, 1)) if in_channels != out_channels or resampled else None
        self.attn = SongAttention(out_channels) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(_resample(nnf.silu(self.norm0(x)), self.resample))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.double_norm:
            s, b = params.chunk(2, dim=1)
            h = self.norm1(h) * pnorm(s) + pnorm(b)  # sCM §4.1 (3)
        else:
            h = self.norm1(h + params)
        h = self.conv1(self.dropout(nnf.silu(h)))
        skip = self.skip(_resample(x, self.resample)) if self.skip is not None else x
        x = (h + skip) * math.sqrt(0.5)
        return self.attn(x) if self.attn is not None else x


@dataclass(frozen=True)
class DDPMppConfig:
    """A DDPM++ shape; levels index ``channel_mult`` (level 0 = full resolution). EDM's CIFAR-10 values are the
    defaults; attention at 16² is level 1 on 32² images."""

    in_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (2, 2, 2)
    num_blocks: int = 4
    attn_levels: tuple[int, ...] = (1,)
    dropout: float = 0.13
    num_classes: int = 0
    augment_dim: int = 0
    double_norm: bool = True

    def validate(self) -> None:
        for name in ("in_channels", "model_channels", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"DDPMppConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"DDPMppConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        if any(not 0 <= i < len(self.channel_mult) for i in self.attn_levels):
            raise ValueError(f"DDPMppConfig.attn_levels must index channel_mult (0..{len(self.channel_mult) - 1}), got {self.attn_levels}")
        if min(self.model_channels, self.model_channels * min(self.channel_mult)) < 4:
            raise ValueError("DDPMppConfig: every width must be >= 4 (GroupNorm groups of 4 channels)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"DDPMppConfig.dropout must be in [0, 1), got {self.dropout}")


class DDPMpp(nn.Module):
    """F_θ(x̂, t) on (N, C, H, W) with H, W divisible by 2^(levels − 1)."""

    amp_dtype: torch.dtype | None = None  # as scm.nn.UNet
    fast_jvp: bool = False  # forward-mode calls use PyTorch's generic rules

    def __init__(self, cfg: DDPMppConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, emb_ch = cfg.model_channels, cfg.model_channels * 4
        block = dict(emb_channels=emb_ch, dropout=cfg.dropout, double_norm=cfg.double_norm)

        # Mapping: noise label (and class, augmentation) -> the embedding every block sees.
        self.map_noise = EDMPositional(C)
        self.map_label = _init(nn.Linear(cfg.num_classes, C)) if cfg.num_classes else None
        self.map_augment = _init(nn.Linear(cfg.augment_dim, C, bias=False)) if cfg.augment_dim else None
        self.map_layer0 = _init(nn.Linear(C, emb_ch))
        self.map_layer1 = _init(nn.Linear(emb_ch, emb_ch))

        # Encoder: a convolution, then per level a downsampling block (below level 0) and num_blocks blocks.
        self.enc = nn.ModuleDict()
        self.enc["l0_conv"] = _init(nn.Conv2d(cfg.in_channels, C, 3, padding=1))
        cout, skips = C, [C]
        for level, mult in enumerate(cfg.channel_mult):
            if level > 0:
                self.enc[f"l{level}_down"] = SongBlock(cout, cout, resample="down", **block)
                skips.append(cout)
            for i in range(cfg.num_blocks):
                self.enc[f"l{level}_block{i}"] = SongBlock(cout, C * mult, attention=level in cfg.attn_levels, **block)
                cout = C * mult
                skips.append(cout)

        # Decoder: two blocks at the lowest resolution (the first attends), per level an upsampling block and
        # num_blocks + 1 blocks fed a skip each (the last of them attends where the level does), then the output.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            if level == len(cfg.channel_mult) - 1:
                self.dec[f"l{level}_in0"] = SongBlock(cout, cout, attention=True, **block)
                self.dec[f"l{level}_in1"] = SongBlock(cout, cout, **block)
            else:
                self.dec[f"l{level}_up"] = SongBlock(cout, cout, resample="up", **block)
            for i in range(cfg.num_blocks + 1):
                attention = i == cfg.num_blocks and level in cfg.attn_levels
                self.dec[f"l{level}_block{i}"] = SongBlock(cout + skips.pop(), C * mult, attention=attention, **block)
                cout = C * mult
        self.out_norm = _group_norm(cout)
        self.out_conv = _init(nn.Conv2d(cout, cfg.in_channels, 3, padding=1), gain=1e-5)

    def embed(self, t: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        cfg = self.cfg
        with float32_region(t):
            emb = self.map_noise(t)
            if self.map_label is not None:
                labels = torch.full((t.shape[0],), cfg.num_classes, device=t.device) if class_labels is None else class_labels
                one_hot = nnf.one_hot(labels.long(), cfg.num_classes + 1)[:, : cfg.num_classes].to(emb.dtype)
                emb = emb + self.map_label(one_hot * math.sqrt(cfg.num_classes))
            if self.map_augment is not None and augment_labels is not None:
                emb = emb + self.map_augment(augment_labels.to(emb.dtype))
            return nnf.silu(self.map_layer1(nnf.silu(self.map_layer0(emb))))

    def forward(self, x_hat: Tensor, t: Tensor, class_labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        emb = self.embed(t, class_labels, augment_labels)
        with _backbone_autocast(self, x_hat):
            x, skips = x_hat, []
            for name, m in self.enc.items():
                x = m(x) if name.endswith("_conv") else m(x, emb)
                skips.append(x)
            for name, m in self.dec.items():
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = m(x, emb)
            return self.out_conv(nnf.silu(self.out_norm(x)))
