"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "config G"), as sCM trains it on ImageNet (App. G).

Every layer keeps activations at unit magnitude in expectation: weights are normalised on every call (and, while
training, forced back to unit norm, EDM2 Eq. 66), SiLU is rescaled (Eq. 81), sums and concatenations are weighted
(Eqs. 88, 103), the input carries a constant channel and the output layer starts at zero gain. The network has no
normalisation layers with statistics and no biases. The widths of the paper's Table 4 (192 … 448 channels at
S … XXL) give its parameter counts (tests/scm/test_mpunet.py).

sCM v2 §4.1 changes three things, each a switch in :class:`MPUNetConfig` so that the same class can also hold a
converted EDM2 checkpoint:

- ``time_embedding="positional"``: the noise label is c_noise(t) = t, embedded with sinusoids (§4.1 (1), (2));
  ``"fourier"`` is EDM2's random Fourier features of c_noise = log(σ)/4 (set by the caller, e.g. the EDM adapter);
- ``double_norm=True``: the embedding modulates each block as y = pnorm(h)⊙pnorm(s(emb)) + pnorm(b(emb)) (§4.1 (3)),
  with pnorm the pixel norm the network already uses; the two terms are joined by EDM2's magnitude-preserving sum.
  EDM2's own modulation is h⊙(1 + g·s(emb)) with a learned gain g that starts at 0 (``double_norm=False``).
  The shift projection b is one more emb→channels layer per block: 293.9 M parameters at S instead of EDM2's
  280.2 M (+4.9 % at every width). The paper's Table 4 lists EDM2's counts, which ``double_norm=False`` matches to
  0.02 % (the test states both);
- ``guidance_embedding=True``: the classifier-free guidance scale of sCD enters like the class label, through its
  own positional embedding and linear layer (App. G, ImageNet 512), added to the embedding with a learned gain that
  starts at 0 rather than by the magnitude-preserving sum, so that a student copied from its teacher computes the
  teacher's function at every s until it learns otherwise.

Called ``net(x_hat, t, class_labels=None, guidance=None)`` like :class:`scm.nn.UNet`: x̂ = x_t/σ_d has unit variance,
which is EDM2's c_in·x. Class labels are integer indices; index ``num_classes`` (or ``None``) is "no label", the
zero vector (label dropout, the unconditional branch of guidance). Forward-mode AD (the sCM tangent) uses PyTorch's
generic rules (``fast_jvp = False``); attention goes through the pluggable op of :mod:`scm.nn`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from scm.nn import ATTENTION_OPS, PluggableAttention, PositionalEmbedding, _backbone_autocast, float32_region

# ---------------------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives (EDM2 App. B).


def normalize(x: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> Tensor:
    """x / (ε + rms(x)) over ``dim`` (default: all but the first): unit magnitude (EDM2 Eq. 47; pixel norm for dim=1)."""
    dims = tuple(range(1, x.ndim)) if dim is None else dim
    n = math.prod(x.shape[d] for d in ((dims,) if isinstance(dims, int) else dims))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # low precision sums in float32
    rms = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=dtype) / math.sqrt(n)
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU divided by its output magnitude for unit-normal input, 0.596 (EDM2 Eq. 81)."""
    return nnf.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1 − t)·a + t·b, rescaled to unit magnitude for independent unit inputs (EDM2 Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Channel concatenation weighted (1 − t) : t, with unit magnitude overall (EDM2 Eq. 103)."""
    Na, Nb = a.shape[1], b.shape[1]
    C = math.sqrt((Na + Nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (C / math.sqrt(Na) * (1 - t)), b * (C / math.sqrt(Nb) * t)], dim=1)


class MPFourier(nn.Module):
    """EDM2's random Fourier features √2·cos(2π(f·c + φ)) of the noise label c (Eq. 75); fixed buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: Tensor) -> Tensor:
        dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
        return torch.cos(c.to(dtype).outer(self.freqs.to(dtype)) + self.phases.to(dtype)) * math.sqrt(2)


class MPPositional(nn.Module):
    """The sinusoidal embedding of c_noise(t) = t (sCM §4.1 (2)), scaled by √2 to unit magnitude."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.pos = PositionalEmbedding(num_channels)

    def forward(self, t: Tensor) -> Tensor:
        return self.pos(t) * math.sqrt(2)


class MPConv(nn.Module):
    """A bias-free convolution (``kernel=(k, k)``) or linear layer (``kernel=()``) with normalised weights.

    The weight is used as w/‖w‖·gain/√fan_in (EDM2 Eq. 47); during a grad-enabled training call it is first forced
    back to unit norm in place (Eq. 66), so that its magnitude cannot drift. No-grad calls (the sCM tangent, the
    EMA copy, sampling) leave it as it is.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.to(torch.float32) if x.dtype != torch.float64 else self.weight
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w) * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return nnf.conv2d(x, w, padding=w.shape[-1] // 2)


class MPAttention(PluggableAttention):
    """Self-attention with pixel-normalised queries, keys and values per head (EDM2 Fig. 21), pluggable op."""

    def __init__(self, channels: int, channels_per_head: int):
        super().__init__()
        self.num_heads = max(channels // channels_per_head, 1)
        self.qkv = MPConv(channels, channels * 3, kernel=(1, 1))
        self.proj = MPConv(channels, channels, kernel=(1, 1))

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        y = self.qkv(x).reshape(N, self.num_heads, C // self.num_heads, 3, H * W)
        q, k, v = (a.transpose(-1, -2) for a in normalize(y, dim=2).unbind(3))  # (N, heads, HW, c) each
        y = ATTENTION_OPS[self.op](q, k, v).transpose(-1, -2)  # (N, heads, c, HW)
        return self.proj(y.reshape(N, C, H, W))


class MPBlock(nn.Module):
    """An encoder ('enc') or decoder ('dec') block: resample, residual branch modulated by emb, optional attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, *, flavor: str, resample: str = "keep",
                 attention: bool = False, channels_per_head: int = 64, dropout: float = 0.0, double_norm: bool = True,
                 res_balance: float = 0.3, attn_balance: float = 0.3, clip_act: float = 256.0):
        super().__init__()
        self.flavor, self.resample = flavor, resample
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.double_norm = double_norm
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        if double_norm:
            self.emb_scale = MPConv(emb_channels, out_channels, kernel=())
            self.emb_shift = MPConv(emb_channels, out_channels, kernel=())
        else:
            self.emb_gain = nn.Parameter(torch.zeros([]))
            self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.dropout = nn.Dropout(dropout)
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn = MPAttention(out_channels, channels_per_head) if attention else None

    def modulate(self, h: Tensor, emb: Tensor) -> Tensor:
        """sCM's pnorm(h)⊙pnorm(s(emb)) + pnorm(b(emb)) (§4.1 (3)), or EDM2's h⊙(1 + g·s(emb))."""
        if self.double_norm:
            s = normalize(self.emb_scale(emb), dim=1)[:, :, None, None]
            b = normalize(self.emb_shift(emb), dim=1)[:, :, None, None]
            return mp_sum(normalize(h, dim=1) * s.to(h.dtype), b.to(h.dtype).expand_as(h))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        return h * c[:, :, None, None].to(h.dtype)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Main branch: EDM2's [1, 1] resampling filter is exactly 2×2 average pooling / nearest upsampling.
        if self.resample == "down":
            x = nnf.avg_pool2d(x, 2)
        elif self.resample == "up":
            x = nnf.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        # Residual branch.
        y = self.conv_res0(mp_silu(x))
        y = mp_silu(self.modulate(y, emb))
        y = self.conv_res1(self.dropout(y))

        # Join the branches, then attend.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.attn is not None:
            x = mp_sum(x, self.attn(x), t=self.attn_balance)
        return x.clamp(-self.clip_act, self.clip_act) if self.clip_act else x


# ---------------------------------------------------------------------------------------------------------------
# The U-Net.


@dataclass(frozen=True)
class MPUNetConfig:
    """An EDM2 U-Net shape. Levels index ``channel_mult`` (level 0 = full resolution), as in :class:`scm.nn.UNetConfig`.

    EDM2 attends at 16² and 8²; on 64² latents with ``channel_mult=(1, 2, 3, 4)`` those are levels 2 and 3.
    ``dropout_levels`` restricts dropout to some levels (the paper's sCT drops out at resolutions ≤ 16 only);
    ``None`` applies it everywhere, as EDM2 does.
    """

    in_channels: int = 4
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_levels: tuple[int, ...] = (2, 3)
    channels_per_head: int = 64
    dropout: float = 0.0
    dropout_levels: tuple[int, ...] | None = None
    num_classes: int = 0
    time_embedding: str = "positional"  # "positional" (sCM: c_noise = t) | "fourier" (EDM2: c_noise = log(σ)/4)
    double_norm: bool = True
    guidance_embedding: bool = False
    label_balance: float = 0.5
    concat_balance: float = 0.5

    def validate(self) -> None:
        for name in ("in_channels", "model_channels", "num_blocks", "channels_per_head"):
            if getattr(self, name) < 1:
                raise ValueError(f"MPUNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"MPUNetConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        levels = range(len(self.channel_mult))
        for name in ("attn_levels", "dropout_levels"):
            if any(i not in levels for i in getattr(self, name) or ()):
                raise ValueError(f"MPUNetConfig.{name} must index channel_mult (0..{len(levels) - 1}), got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MPUNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.time_embedding not in ("positional", "fourier"):
            raise ValueError(f"MPUNetConfig.time_embedding must be 'positional' or 'fourier', got {self.time_embedding!r}")


class MPUNet(nn.Module):
    """F_θ(x̂, t) on (N, C, H, W) with H, W divisible by 2^(levels − 1)."""

    amp_dtype: torch.dtype | None = None  # as scm.nn.UNet: autocast dtype of the backbone in a plain forward
    fast_jvp: bool = False  # no hand-written tangent path: forward-mode calls use PyTorch's generic rules

    def __init__(self, cfg: MPUNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        cblock = [cfg.model_channels * m for m in cfg.channel_mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding of the noise label, the class label and the guidance scale.
        self.emb_time = MPPositional(cnoise) if cfg.time_embedding == "positional" else MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(cfg.num_classes, cemb, kernel=()) if cfg.num_classes else None
        self.emb_guidance_pos = MPPositional(cnoise) if cfg.guidance_embedding else None
        self.emb_guidance = MPConv(cnoise, cemb, kernel=()) if cfg.guidance_embedding else None
        self.emb_guidance_gain = nn.Parameter(torch.zeros([])) if cfg.guidance_embedding else None

        def block(cin: int, cout: int, level: int, flavor: str, **kw) -> MPBlock:
            p = cfg.dropout if cfg.dropout_levels is None or level in cfg.dropout_levels else 0.0
            return MPBlock(cin, cout, cemb, flavor=flavor, channels_per_head=cfg.channels_per_head, dropout=p,
                           double_norm=cfg.double_norm, **kw)

        # Encoder: a convolution at full resolution, then per level a downsampling block and num_blocks blocks.
        self.enc = nn.ModuleDict()
        cout = cfg.in_channels + 1  # the input carries a constant channel of ones
        for level, channels in enumerate(cblock):
            if level == 0:
                self.enc[f"l{level}_conv"] = MPConv(cout, channels, kernel=(3, 3))
                cout = channels
            else:
                self.enc[f"l{level}_down"] = block(cout, cout, level, "enc", resample="down")
            for i in range(cfg.num_blocks):
                self.enc[f"l{level}_block{i}"] = block(cout, channels, level, "enc", attention=level in cfg.attn_levels)
                cout = channels

        # Decoder: two blocks at the lowest resolution (the first attends), then per level an upsampling block and
        # num_blocks + 1 blocks, each fed one skip connection.
        self.dec = nn.ModuleDict()
        skips = [m.out_channels if isinstance(m, MPConv) else m.conv_res1.out_channels for m in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            if level == len(cblock) - 1:
                self.dec[f"l{level}_in0"] = block(cout, cout, level, "dec", attention=True)
                self.dec[f"l{level}_in1"] = block(cout, cout, level, "dec")
            else:
                self.dec[f"l{level}_up"] = block(cout, cout, level, "dec", resample="up")
            for i in range(cfg.num_blocks + 1):
                self.dec[f"l{level}_block{i}"] = block(cout + skips.pop(), channels, level, "dec",
                                                       attention=level in cfg.attn_levels)
                cout = channels
        self.out_conv = MPConv(cout, cfg.in_channels, kernel=(3, 3))

    def embed(self, t: Tensor, class_labels: Tensor | None, guidance: Tensor | None) -> Tensor:
        """emb = mp_silu(mp_sum(noise emb, label emb) [+ g·guidance emb]), in float32 (float64 for float64 t)."""
        cfg = self.cfg
        with float32_region(t):
            emb = self.emb_noise(self.emb_time(t))
            if self.emb_label is not None:
                labels = torch.full((t.shape[0],), cfg.num_classes, device=t.device) if class_labels is None else class_labels
                one_hot = nnf.one_hot(labels.long(), cfg.num_classes + 1)[:, : cfg.num_classes].to(emb.dtype)
                emb = mp_sum(emb, self.emb_label(one_hot * math.sqrt(cfg.num_classes)), t=cfg.label_balance)
            if self.emb_guidance is not None:
                s = torch.ones_like(t) if guidance is None else guidance.to(t.dtype).expand_as(t)
                emb = emb + self.emb_guidance(self.emb_guidance_pos(s), gain=self.emb_guidance_gain)
            return mp_silu(emb)

    def forward(self, x_hat: Tensor, t: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        emb = self.embed(t, class_labels, guidance)
        with _backbone_autocast(self, x_hat):
            x = torch.cat([x_hat, torch.ones_like(x_hat[:, :1])], dim=1)
            skips = []
            for name, m in self.enc.items():
                x = m(x) if name.endswith("_conv") else m(x, emb.to(x.dtype))
                skips.append(x)
            for name, m in self.dec.items():
                if "_block" in name:
                    x = mp_cat(x, skips.pop(), t=self.cfg.concat_balance)
                x = m(x, emb.to(x.dtype))
            return self.out_conv(x, gain=self.out_gain)
