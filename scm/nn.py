"""Networks F_θ(x̂, c_noise(t)) for TrigFlow, with the stability changes of sCM v2 §4.1.

Both networks take ``(x_hat, t, class_labels=None)`` where x̂ = x_t/σ_d and return F of x̂'s shape. They use
- c_noise(t) = t (§4.1 (1)): ``t`` goes into the embedding unscaled;
- a positional (sinusoidal) time embedding (§4.1 (2)), always computed in float32;
- precision decided at one boundary: ``net.amp_dtype`` (None, or e.g. ``torch.bfloat16`` on CUDA, set by the stage
  that trains the network) autocasts the backbone of a plain forward, the only autocast in the project; the time
  embedding, the loss weight w_φ and every forward-mode (tangent) call stay float32 (:func:`float32_region`);
- adaptive double normalisation y = norm(x)⊙pnorm(s(t)) + pnorm(b(t)) (§4.1 (3));
- GroupNorm, never BatchNorm: BatchNorm's in-place running statistics break ``torch.func.jvp`` (§4.1 (4));
- attention through a pluggable op: ``"math"`` (explicit softmax, supports forward-mode AD everywhere) or ``"sdpa"``
  (PyTorch's fused kernels, which lack forward-mode AD on some backends, §4.1 (5)).

Called with dual inputs (``torch.func.jvp``, ``torch.autograd.forward_ad``), UNet and MLP take a hand-written
forward-mode path that is several times cheaper than generic forward AD (see "Forward-mode fast path" below);
``net.fast_jvp = False`` selects generic forward AD instead.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as nnf
from torch import Tensor, nn

from scm.scales import SCALES

# ---------------------------------------------------------------------------------------------------------------
# Primitives.


def float32_region(x: Tensor) -> contextlib.AbstractContextManager:
    """Code that keeps its inputs' precision whatever autocast is active around it.

    The project marks exactly these places: the time embedding (:class:`Conditioning`), the loss weight
    (:class:`AdaptiveWeight`) and the sCM tangent (:func:`scm.losses.scm_loss`). Low-precision time features or
    tangents are the known failure mode of continuous-time CMs at scale (docs/method.md, "Precision").
    """
    return torch.autocast(device_type=x.device.type, enabled=False)


def pnorm(a: Tensor, eps: float = 1e-8) -> Tensor:
    """Pixel norm over channels (dim 1), a/√(mean_c(a²) + ε) (PGGAN; used by sCM v2 §4.1 (3))."""
    return a / torch.sqrt(a.square().mean(dim=1, keepdim=True) + eps)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of c_noise(t) = t (sCM v2 §4.1 (2)), in float32 (float64 for float64 t)."""

    def __init__(self, num_channels: int, max_positions: int = 10000):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions

    def _freqs(self, t: Tensor) -> Tensor:
        half = self.num_channels // 2
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        return (1 / self.max_positions) ** (torch.arange(half, device=t.device, dtype=dtype) / half)

    def forward(self, t: Tensor) -> Tensor:
        freqs = self._freqs(t)
        x = t.to(freqs.dtype).outer(freqs)  # (N, half)
        return torch.cat([torch.cos(x), torch.sin(x)], dim=1)

    def _jvp(self, t: Tensor, t_t: Tensor) -> Pair:
        freqs = self._freqs(t)
        x, x_t = t.to(freqs.dtype).outer(freqs), t_t.to(freqs.dtype).outer(freqs)
        cos, sin = torch.cos(x), torch.sin(x)
        return torch.cat([cos, sin], dim=1), torch.cat([-sin * x_t, cos * x_t], dim=1)


def attention_math(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention written out, so forward-mode AD (``torch.func.jvp``) works on every backend."""
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (N, heads, L, L)
    return w @ v  # (N, heads, L, d)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused scaled-dot-product attention: fast, but no forward-mode AD on some backends."""
    return nnf.scaled_dot_product_attention(q, k, v)


ATTENTION_OPS = {"math": attention_math, "sdpa": attention_sdpa}


class PluggableAttention(nn.Module):
    """An attention layer whose softmax attention runs through ``ATTENTION_OPS[self.op]`` (set by :func:`attention_op`)."""

    op: str = "math"


def set_attention_op(net: nn.Module, op: str) -> None:
    """Select the attention op of every :class:`PluggableAttention` in ``net``."""
    if op not in ATTENTION_OPS:
        raise ValueError(f"attention op must be one of {', '.join(ATTENTION_OPS)}, got {op!r}")
    for m in net.modules():
        if isinstance(m, PluggableAttention):
            m.op = op


@contextlib.contextmanager
def attention_op(net: nn.Module, op: str) -> Iterator[None]:
    """Temporarily switch every attention layer of ``net`` to ``op`` (e.g. ``"math"`` for the JVP pass)."""
    saved = [(m, m.op) for m in net.modules() if isinstance(m, PluggableAttention)]
    set_attention_op(net, op)
    try:
        yield
    finally:
        for m, o in saved:
            m.op = o


# ---------------------------------------------------------------------------------------------------------------
# Forward-mode fast path.
#
# The sCM tangent is one forward-mode JVP through F_θ with tangents on the inputs (x̂, t) only
# (scm.losses.jvp_tangent). PyTorch's generic forward AD is slow at this on CPU: each op that mixes a dual tensor
# with a parameter or a Python scalar gives the latter an "efficient zero" tangent whose shape logic runs in Python
# (~0.1 ms an op), convolution_jvp still convolves x with the weight's zero tangent (3 convolutions per layer), and
# GroupNorm's formula is ~20 small ops: the JVP cost ~4.5 plain forwards (cpu-s, batch 128, one thread; ~2.6 here).
#
# So when UNet or MLP get dual inputs (``torch.func.jvp`` or ``torch.autograd.forward_ad``) and no parameter or
# buffer is dual, they unpack the duals, run ``_jvp`` (the same forward on the primals, by the very same modules,
# plus each layer's tangent written out below) and return a dual again. The tangent equals generic forward AD's up
# to float round-off (tests/scm/test_nn.py); dropout draws its masks exactly as the plain forward does; everything
# is ordinary differentiable ops, so gradients through either output still flow. Plain calls (training, sampling,
# the float64 finite-difference oracle) never enter this path. Attention's primal and tangent use the "math" op.
# A network's ``fast_jvp`` attribute (True unless set otherwise) chooses this path; False falls back to generic
# forward AD (the tests compare the two).

Pair = tuple[Tensor, Tensor]  # (primal, tangent)


def _is_dual(*inputs: Tensor) -> bool:
    """Whether some input carries a forward-mode tangent (``torch.func.jvp`` or ``torch.autograd.forward_ad``)."""
    return any(fwAD.unpack_dual(x).tangent is not None for x in inputs)


def _backbone_autocast(module: nn.Module, x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast to ``module.amp_dtype`` for a plain float32 forward; tangent calls and float64 inputs run as given."""
    dtype = module.amp_dtype
    if dtype is None or x.dtype != torch.float32 or _is_dual(x):
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, dtype=dtype)


def _unpack_duals(module: nn.Module, *inputs: Tensor) -> list[Pair] | None:
    """(primal, tangent) of each input if some input is dual and no parameter or buffer is; else None (generic AD)."""
    if not module.fast_jvp:
        return None
    unpacked = [fwAD.unpack_dual(x) for x in inputs]
    if all(u.tangent is None for u in unpacked):
        return None
    if any(fwAD.unpack_dual(p).tangent is not None for p in itertools.chain(module.parameters(), module.buffers())):
        return None
    return [(u.primal, torch.zeros_like(u.primal) if u.tangent is None else u.tangent) for u in unpacked]


def _affine_jvp(m: nn.Module, x: Tensor, x_t: Tensor) -> Pair:
    """A linear(-plus-bias) layer: the tangent is the layer without its bias applied to x_t."""
    if isinstance(m, nn.Conv2d):
        return m(x), m._conv_forward(x_t, m.weight, None)
    if isinstance(m, nn.Linear):
        return m(x), nnf.linear(x_t, m.weight)
    if isinstance(m, (nn.AvgPool2d, nn.Upsample, nn.Identity)):
        return m(x), m(x_t)
    raise TypeError(f"no forward-mode rule for {type(m).__name__}")


def _silu_jvp(x: Tensor, x_t: Tensor) -> Pair:
    """silu'(x)·x_t = x_t·s·(1 + x·(1 − s)), s = sigmoid(x): under no grad in one kernel (autograd's own formula,
    which has no derivative itself), else written out so that gradients flow through the tangent."""
    if torch.is_grad_enabled():
        s = torch.sigmoid(x)
        return nnf.silu(x), x_t * s * (1 + x * (1 - s))
    return nnf.silu(x), torch.ops.aten.silu_backward(x_t, x)


def _dropout_jvp(m: nn.Dropout, x: Tensor, x_t: Tensor) -> Pair:
    if not m.training or m.p == 0:
        return x, x_t
    noise = m(torch.ones_like(x))  # mask/(1 − p), drawn with the same RNG calls as m(x)
    return x * noise, x_t * noise


def _group_norm_jvp(m: nn.GroupNorm, x: Tensor, x_t: Tensor) -> Pair:
    """With x̂ = (x − μ)/σ over each group, the tangent is γ·(x_t − mean(x_t) − x̂·mean(x̂·x_t))/σ."""
    y = m(x)
    N, C, G, HW = x.shape[0], x.shape[1], m.num_groups, math.prod(x.shape[2:])
    # x̂ and 1/σ from the GroupNorm kernel itself (torch.var_mean is ~10x slower), in y's (autocast) dtype.
    xn, _, rstd = torch.native_group_norm(x.to(y.dtype).contiguous(), None, None, N, C, HW, G, m.eps)
    xn, tg = xn.reshape(N, G, C // G, HW), x_t.to(y.dtype).reshape(N, G, C // G, HW)
    mean_t = tg.mean(dim=(2, 3), keepdim=True)
    cov = torch.linalg.vecdot(xn.flatten(2), tg.flatten(2))[:, :, None, None] / (C // G * HW)  # mean(x̂·x_t)
    a = rstd[:, :, None, None]  # γ/σ per (sample, channel)
    if m.weight is not None:
        a = a * m.weight.to(y.dtype).reshape(G, C // G, 1)
    y_t = (tg - mean_t).mul_(a).addcmul_(xn, a * -cov)  # in place: fresh temporaries are costly on CPU
    return y, y_t.reshape(x.shape)


def _pnorm_jvp(a: Tensor, a_t: Tensor, eps: float = 1e-8) -> Pair:
    """pnorm: with n = √(mean_c(a²) + ε) and y = a/n, the tangent is (a_t − y·mean_c(y·a_t))/n."""
    n = torch.sqrt(a.square().mean(dim=1, keepdim=True) + eps)
    y = a / n
    return y, (a_t - y * (y * a_t).mean(dim=1, keepdim=True)) / n


class AdaDoubleNorm(nn.Module):
    """Adaptive double normalisation y = GN(x)⊙pnorm(s(emb)) + pnorm(b(emb)) (sCM v2 §4.1 (3))."""

    def __init__(self, channels: int, emb_channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.scale = nn.Linear(emb_channels, channels)
        self.shift = nn.Linear(emb_channels, channels)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        s = pnorm(self.scale(emb))
        b = pnorm(self.shift(emb))
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        return self.norm(x) * s.reshape(shape) + b.reshape(shape)

    def _jvp(self, x: Tensor, x_t: Tensor, emb: Tensor, emb_t: Tensor) -> Pair:
        n, n_t = _group_norm_jvp(self.norm, x, x_t)
        s, s_t = _pnorm_jvp(*_affine_jvp(self.scale, emb, emb_t))
        b, b_t = _pnorm_jvp(*_affine_jvp(self.shift, emb, emb_t))
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        s, s_t, b, b_t = (a.reshape(shape) for a in (s, s_t, b, b_t))
        return n * s + b, (n * s_t).add_(b_t).addcmul_(n_t, s)  # n_t·s + n·s_t + b_t, in place on one temporary


class Attention(PluggableAttention):
    """Multi-head self-attention over the pixels of a feature map, with a pluggable op."""

    def __init__(self, channels: int, num_heads: int, groups: int, op: str = "math"):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        N, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(N, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (N, heads, HW, d)
        y = ATTENTION_OPS[self.op](q, k, v)  # (N, heads, HW, d)
        return x + self.proj(y.transpose(-1, -2).reshape(N, C, H, W))

    def _jvp(self, x: Tensor, x_t: Tensor) -> Pair:
        """Math attention w = softmax(qkᵀ/√d), y = w·v with w_t = w⊙(ℓ_t − Σ_j w ℓ_t), ℓ_t = (q_t kᵀ + q k_tᵀ)/√d."""
        N, C, H, W = x.shape
        qkv, qkv_t = _affine_jvp(self.qkv, *_group_norm_jvp(self.norm, x, x_t))
        split = lambda a: a.reshape(N, 3, self.num_heads, C // self.num_heads, H * W).transpose(-1, -2).unbind(1)
        (q, k, v), (q_t, k_t, v_t) = split(qkv), split(qkv_t)  # (N, heads, HW, d) each, as in forward()
        scale = math.sqrt(q.shape[-1])
        w = torch.softmax(q @ k.transpose(-1, -2) / scale, dim=-1)  # as attention_math
        logits_t = (q_t @ k.transpose(-1, -2) + q @ k_t.transpose(-1, -2)) / scale
        w_t = w * (logits_t - (w * logits_t).sum(dim=-1, keepdim=True))
        merge = lambda a: a.transpose(-1, -2).reshape(N, C, H, W)
        p, p_t = _affine_jvp(self.proj, merge(w @ v), merge(w_t @ v + w @ v_t))
        return x + p, x_t + p_t


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then AdaDoubleNorm(emb)-SiLU-dropout-conv, plus a (1×1) skip; optional attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, *, dropout: float, groups: int, attention: bool, num_heads: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(min(groups, in_ch), in_ch)
        self.conv0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm1 = AdaDoubleNorm(out_ch, emb_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = Attention(out_ch, num_heads, groups) if attention else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(nnf.silu(self.norm0(x)))
        h = self.conv1(self.dropout(nnf.silu(self.norm1(h, emb))))
        x = self.skip(x) + h
        return self.attn(x) if self.attn is not None else x

    def _jvp(self, x: Tensor, x_t: Tensor, emb: Tensor, emb_t: Tensor) -> Pair:
        h = _affine_jvp(self.conv0, *_silu_jvp(*_group_norm_jvp(self.norm0, x, x_t)))
        h = _dropout_jvp(self.dropout, *_silu_jvp(*self.norm1._jvp(*h, emb, emb_t)))
        (h, h_t), (s, s_t) = _affine_jvp(self.conv1, *h), _affine_jvp(self.skip, x, x_t)
        x, x_t = s + h, s_t + h_t
        return self.attn._jvp(x, x_t) if self.attn is not None else (x, x_t)


class Conditioning(nn.Module):
    """emb = MLP(PosEmb(t)) (+ label embedding) (+ guidance embedding): the shared conditioning vector of every block.

    The guidance scale s of sCD's classifier-free guidance enters through its own positional embedding and linear
    layer, added like the label (paper App. G, ImageNet 512); s = 1 (no guidance) when not given.
    """

    def __init__(self, base_channels: int, emb_channels: int, num_classes: int, guidance: bool = False):
        super().__init__()
        self.pos = PositionalEmbedding(base_channels)
        self.mlp = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        self.num_classes = num_classes
        # Index num_classes is the "no label" token (label dropout / classifier-free guidance).
        self.label = nn.Embedding(num_classes + 1, emb_channels) if num_classes > 0 else None
        self.guidance = nn.Sequential(PositionalEmbedding(base_channels), nn.Linear(base_channels, emb_channels)) if guidance else None
        if self.guidance is not None:  # zero at first: a student copied from its teacher starts as the teacher at every s
            nn.init.zeros_(self.guidance[1].weight)
            nn.init.zeros_(self.guidance[1].bias)

    def _extra(self, emb: Tensor, t: Tensor, class_labels: Tensor | None, guidance: Tensor | None) -> Tensor:
        """emb plus the label and guidance embeddings (neither depends on t, so neither has a tangent)."""
        if self.label is not None:
            if class_labels is None:
                class_labels = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label(class_labels)
        if self.guidance is not None:
            s = torch.ones_like(t) if guidance is None else guidance.to(t.dtype).expand_as(t)
            with float32_region(t):
                emb = emb + self.guidance(s)
        return emb

    def forward(self, t: Tensor, class_labels: Tensor | None, guidance: Tensor | None = None) -> Tensor:
        with float32_region(t):
            emb = self.mlp(self.pos(t))
        return nnf.silu(self._extra(emb, t, class_labels, guidance))

    def _jvp(self, t: Tensor, t_t: Tensor, class_labels: Tensor | None, guidance: Tensor | None = None) -> Pair:
        with float32_region(t):
            emb = self.pos._jvp(t, t_t)
            emb = _affine_jvp(self.mlp[2], *_silu_jvp(*_affine_jvp(self.mlp[0], *emb)))
        return _silu_jvp(self._extra(emb[0], t, class_labels, guidance), emb[1])


# ---------------------------------------------------------------------------------------------------------------
# U-Net for images (pixels or autoencoder latents).


@dataclass(frozen=True)
class UNetConfig:
    """A U-Net shape. ``attn_levels`` are indices into ``channel_mult`` (level 0 = full resolution)."""

    in_channels: int = 1
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    num_heads: int = 1
    dropout: float = 0.0
    num_classes: int = 0
    groups: int = 8
    guidance_embedding: bool = False  # sCD students of guided teachers take the guidance scale s

    def validate(self) -> None:
        for name in ("in_channels", "model_channels", "num_blocks", "num_heads", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of ints >= 1, got {self.channel_mult}")
        for c in (self.model_channels * m for m in self.channel_mult):
            if c % self.groups or c % self.num_heads:
                raise ValueError(f"UNetConfig: every width ({c}) must be divisible by groups={self.groups} and num_heads={self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")
        if any(not 0 <= i < len(self.channel_mult) for i in self.attn_levels):
            raise ValueError(f"UNetConfig.attn_levels must index channel_mult (0..{len(self.channel_mult) - 1}), got {self.attn_levels}")


class UNet(nn.Module):
    """F_θ(x̂, t) on (N, C, H, W); any H, W (skips are matched by nearest upsampling to the skip's size)."""

    amp_dtype: torch.dtype | None = None  # autocast dtype of the backbone in a plain forward; None = the inputs'
    fast_jvp: bool = True  # forward-mode calls take the hand-written tangent path

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        C, emb_ch = cfg.model_channels, cfg.model_channels * 4
        block = dict(emb_ch=emb_ch, dropout=cfg.dropout, groups=cfg.groups, num_heads=cfg.num_heads)
        self.cond = Conditioning(C, emb_ch, cfg.num_classes, cfg.guidance_embedding)
        self.conv_in = nn.Conv2d(cfg.in_channels, C, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [C], C
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_blocks):
                self.down.append(ResBlock(ch, C * mult, attention=level in cfg.attn_levels, **block))
                ch = C * mult
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.AvgPool2d(2))
                skips.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, attention=True, **block), ResBlock(ch, ch, attention=False, **block)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), C * mult, attention=level in cfg.attn_levels, **block))
                ch = C * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
        self.norm_out = nn.GroupNorm(cfg.groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, x_hat: Tensor, t: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        if (duals := _unpack_duals(self, x_hat, t)) is not None:
            return fwAD.make_dual(*self._jvp(*duals, class_labels, guidance))
        emb = self.cond(t, class_labels, guidance)
        with _backbone_autocast(self, x_hat):
            h = self.conv_in(x_hat)
            hs = [h]
            for m in self.down:
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
                hs.append(h)
            for m in self.mid:
                h = m(h, emb)
            for m in self.up:
                if isinstance(m, ResBlock):
                    skip = hs.pop()
                    if h.shape[-2:] != skip.shape[-2:]:  # odd sizes: 7 -> 3 -> 6 is matched back to 7
                        h = nnf.interpolate(h, size=skip.shape[-2:], mode="nearest")
                    h = m(torch.cat([h, skip], dim=1), emb)
                else:
                    h = m(h)
            return self.conv_out(nnf.silu(self.norm_out(h)))

    def _jvp(self, x_hat: Pair, t: Pair, class_labels: Tensor | None, guidance: Tensor | None = None) -> Pair:
        """forward() on (primal, tangent) pairs (see "Forward-mode fast path")."""
        emb = self.cond._jvp(*t, class_labels, guidance)
        h = _affine_jvp(self.conv_in, *x_hat)
        hs = [h]
        for m in self.down:
            h = m._jvp(*h, *emb) if isinstance(m, ResBlock) else _affine_jvp(m, *h)
            hs.append(h)
        for m in self.mid:
            h = m._jvp(*h, *emb)
        for m in self.up:
            if isinstance(m, ResBlock):
                skip = hs.pop()
                if h[0].shape[-2:] != skip[0].shape[-2:]:
                    h = tuple(nnf.interpolate(a, size=skip[0].shape[-2:], mode="nearest") for a in h)
                h = m._jvp(*(torch.cat([a, b], dim=1) for a, b in zip(h, skip)), *emb)
            else:
                h = _affine_jvp(m, *h)
        return _affine_jvp(self.conv_out, *_silu_jvp(*_group_norm_jvp(self.norm_out, *h)))


# ---------------------------------------------------------------------------------------------------------------
# MLP for low-dimensional data.


@dataclass(frozen=True)
class MLPConfig:
    dim: int = 2
    width: int = 128
    depth: int = 3
    dropout: float = 0.0
    num_classes: int = 0
    groups: int = 8
    guidance_embedding: bool = False


class MLPBlock(nn.Module):
    def __init__(self, width: int, emb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm = AdaDoubleNorm(width, emb_ch, groups)
        self.linear = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.linear(self.dropout(nnf.silu(self.norm(h, emb))))

    def _jvp(self, h: Tensor, h_t: Tensor, emb: Tensor, emb_t: Tensor) -> Pair:
        a, a_t = _affine_jvp(self.linear, *_dropout_jvp(self.dropout, *_silu_jvp(*self.norm._jvp(h, h_t, emb, emb_t))))
        return h + a, h_t + a_t


class MLP(nn.Module):
    """F_θ(x̂, t) on (N, D): residual blocks with adaptive double normalisation."""

    amp_dtype: torch.dtype | None = None  # as UNet's
    fast_jvp: bool = True

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        if cfg.width % cfg.groups:
            raise ValueError(f"MLPConfig.width ({cfg.width}) must be divisible by groups ({cfg.groups})")
        self.cfg = cfg
        self.cond = Conditioning(cfg.width, cfg.width, cfg.num_classes, cfg.guidance_embedding)
        self.inp = nn.Linear(cfg.dim, cfg.width)
        self.blocks = nn.ModuleList([MLPBlock(cfg.width, cfg.width, cfg.dropout, cfg.groups) for _ in range(cfg.depth)])
        self.norm_out = nn.GroupNorm(cfg.groups, cfg.width)
        self.out = nn.Linear(cfg.width, cfg.dim)

    def forward(self, x_hat: Tensor, t: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        if (duals := _unpack_duals(self, x_hat, t)) is not None:
            return fwAD.make_dual(*self._jvp(*duals, class_labels, guidance))
        emb = self.cond(t, class_labels, guidance)
        with _backbone_autocast(self, x_hat):
            h = self.inp(x_hat)
            for block in self.blocks:
                h = block(h, emb)
            return self.out(nnf.silu(self.norm_out(h)))

    def _jvp(self, x_hat: Pair, t: Pair, class_labels: Tensor | None, guidance: Tensor | None = None) -> Pair:
        """forward() on (primal, tangent) pairs (see "Forward-mode fast path")."""
        emb = self.cond._jvp(*t, class_labels, guidance)
        h = _affine_jvp(self.inp, *x_hat)
        for block in self.blocks:
            h = block._jvp(*h, *emb)
        return _affine_jvp(self.out, *_silu_jvp(*_group_norm_jvp(self.norm_out, *h)))


# ---------------------------------------------------------------------------------------------------------------
# Adaptive weighting head w_φ(t) (sCM v2 §4.2, App. D; EDM2's uncertainty weighting).


class AdaptiveWeight(nn.Module):
    """w_φ(t) = Linear(Fourier(log tan t)), initialised to 0 so training starts unweighted.

    The head sees the log-SNR-like log(tan t) = log(σ/σ_d) through fixed random Fourier features (EDM2's logvar
    head), which resolves both ends of [0, π/2]; it is not differentiated by the JVP, so c_noise(t) = t does not apply.
    """

    def __init__(self, channels: int = 128):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(channels, generator=g))
        self.register_buffer("phases", torch.rand(channels, generator=g))
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor) -> Tensor:
        with float32_region(t):
            x = torch.log(torch.tan(t.float()).clamp(1e-4, 1e4))  # (N,)
            emb = torch.cos(2 * math.pi * (x.outer(self.freqs) + self.phases)) * math.sqrt(2)  # (N, C)
            return self.linear(emb).squeeze(1)


# ---------------------------------------------------------------------------------------------------------------
# The named scales that are this U-Net (the table: scm/scales.py).


def unet_config(scale: str, *, in_channels: int, dropout: float = 0.0, num_classes: int = 0) -> UNetConfig:
    """The :class:`UNetConfig` of a named scale whose network is this U-Net (``scm.networks`` covers them all)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} (accepted: {', '.join(SCALES)})")
    s = SCALES[scale]
    if s.network != "unet":
        raise ValueError(f"scale {scale!r} is a {s.network} network, not this U-Net (use scm.networks.network_config)")
    return UNetConfig(in_channels=in_channels, model_channels=s.model_channels, channel_mult=s.channel_mult,
                      num_blocks=s.num_blocks, attn_levels=s.attn_levels, num_heads=s.num_heads, dropout=dropout,
                      num_classes=num_classes, groups=8)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
