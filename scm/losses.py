"""Training objectives: the TrigFlow diffusion loss (teacher) and the sCM loss (sCD and sCT), sCM v2 §3-§5.

Both return a :class:`LossOutput` whose ``loss`` is a scalar to back-propagate and whose ``stats`` are floats to log.
The networks are called as ``net(x_hat, t, class_labels)`` (see :mod:`scm.nn`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from scm.nn import attention_op, float32_region
from scm.trigflow import (VelocityFn, add_noise, append_dims, check_finite, check_sigma_data, t_from_normal,
                          velocity_target)

# Tangent normalisation constant c (paper §4.2).
TANGENT_C = 0.1


@dataclass
class LossOutput:
    loss: Tensor  # scalar, differentiable
    per_sample: Tensor  # (N,), detached
    t: Tensor  # (N,), the sampled times
    stats: dict[str, float] = field(default_factory=dict)


def _mean_dims(x: Tensor) -> Tensor:
    """Mean over all non-batch dims: (N, ...) -> (N,)."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def adaptive_weighted(sq_err: Tensor, w: Tensor | None) -> Tensor:
    """Adaptive weighting e^{w_φ(t)}·mean_dims(err²) − w_φ(t) (paper Eq. 8; EDM2 uncertainty weighting).

    ``sq_err`` is the per-sample mean squared error (N,). Without a head, the plain per-sample MSE.
    At the optimum over w, e^{w}·E[err²] = 1: the loss magnitude is equal across t.
    """
    return sq_err if w is None else torch.exp(w) * sq_err - w


@dataclass
class Noise:
    """The standard normals behind one batch: ``u`` (N,) for the time proposal and ``eps`` (N, ...) for the noise;
    for a class-conditional batch also ``c`` (N,), uniform on [0, 1): the label dropout of a teacher
    (:func:`drop_labels`) or the guidance scale of an sCD student (:func:`guidance_scale`).

    The losses draw their own by default. A data-parallel trainer draws them for the whole global batch on every rank
    and hands each rank its slice, so that N ranks see exactly the noise a single process would.
    """

    u: Tensor
    eps: Tensor
    c: Tensor | None = None

    @staticmethod
    def draw(shape: tuple[int, ...], *, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, conditional: bool = False) -> Noise:
        """u ~ N(0, 1), then eps ~ N(0, I) of ``shape``, then (``conditional``) c ~ U[0, 1), in this order: a batch's
        noise depends on the seed only, and an unconditional batch draws exactly what it drew before ``c`` existed."""
        u = torch.randn(shape[0], generator=generator, device=device)
        eps = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        c = torch.rand(shape[0], generator=generator, device=device) if conditional else None
        return Noise(u, eps, c)

    def __getitem__(self, index: slice | Tensor) -> Noise:
        return Noise(self.u[index], self.eps[index], None if self.c is None else self.c[index])


def drop_labels(class_labels: Tensor, c: Tensor, p: float, num_classes: int) -> Tensor:
    """Label dropout: each label becomes the null label ``num_classes`` where c < p (c ~ U[0, 1) per sample).

    It trains the unconditional branch of classifier-free guidance in the same network (paper App. G, ImageNet 512:
    p = 0.1); the networks of :mod:`scm.nn` and :mod:`scm.mpunet` read index ``num_classes`` as "no label"."""
    return torch.where(c.to(class_labels.device) < p, torch.full_like(class_labels, num_classes), class_labels)


def guidance_scale(c: Tensor, s_max: float) -> Tensor:
    """s = 1 + (s_max − 1)·c ~ U[1, s_max] from c ~ U[0, 1): sCD's per-sample guidance scale (paper App. G)."""
    return 1.0 + (s_max - 1.0) * c


def _t_and_z(x0: Tensor, noise: Noise | None, P_mean: float, P_std: float, sigma_data: float,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """t from the log-normal proposal and z ~ N(0, σ_d² I), the noise with the data's std (paper §3, Alg. 1)."""
    if noise is None:
        noise = Noise.draw(tuple(x0.shape), generator=generator, device=x0.device, dtype=x0.dtype)
    if noise.eps.shape != x0.shape:
        raise ValueError(f"noise of shape {tuple(noise.eps.shape)} for x0 of shape {tuple(x0.shape)}")
    t = t_from_normal(noise.u, P_mean, P_std, sigma_data).to(x0.dtype)
    z = sigma_data * noise.eps.to(x0.dtype)
    return t, z


# ---------------------------------------------------------------------------------------------------------------
# Teacher: the TrigFlow diffusion loss.


def diffusion_loss(net: nn.Module, x0: Tensor, *, sigma_data: float, P_mean: float, P_std: float,
                   weight_head: nn.Module | None = None, class_labels: Tensor | None = None,
                   generator: torch.Generator | None = None, noise: Noise | None = None) -> LossOutput:
    """TrigFlow diffusion loss E‖σ_d F_θ(x_t/σ_d, t) − v_t‖², v_t = cos t·z − sin t·x0 (paper Eq. 4).

    Written in F-space, ‖F_θ − v_t/σ_d‖², with the log-normal proposal (P_mean, P_std) and optional adaptive weighting.
    ``noise`` fixes the batch's randomness (else drawn from ``generator``). Precision is the network's own
    (``net.amp_dtype``, :mod:`scm.nn`): the targets, the weighting and the loss are float32.
    """
    check_sigma_data(sigma_data)
    check_finite(x0, "x0")
    t, z = _t_and_z(x0, noise, P_mean, P_std, sigma_data, generator)
    x_t = add_noise(x0, z, t)
    v_t = velocity_target(x0, z, t)
    F = net(x_t / sigma_data, t, class_labels)
    sq_err = _mean_dims((F.float() - v_t / sigma_data) ** 2)
    w = weight_head(t) if weight_head is not None else None
    per_sample = adaptive_weighted(sq_err, w)
    return LossOutput(per_sample.mean(), per_sample.detach(), t, {"mse": sq_err.mean().item()})


# ---------------------------------------------------------------------------------------------------------------
# sCM: the tangent and the loss.


def call_net(net: nn.Module, x_hat: Tensor, t: Tensor, class_labels: Tensor | None,
             guidance: Tensor | None = None) -> Tensor:
    """F_θ(x̂, t[, labels][, s]): the guidance scale is passed only to students that take one."""
    return net(x_hat, t, class_labels) if guidance is None else net(x_hat, t, class_labels, guidance=guidance)


def jvp_tangent(net: nn.Module, x_t: Tensor, t: Tensor, dxt_dt: Tensor, *, sigma_data: float,
                class_labels: Tensor | None = None, guidance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """F⁻ and J = cos t·sin t·dF⁻/dt by one forward-mode JVP, under no grad (paper §5.1, "JVP rearrangement").

    Primals (x_t/σ_d, t), tangents (cos t sin t·(dx_t/dt)/σ_d, cos t sin t); this is the dimensionally consistent
    form (docs/method.md, "The tangent"), *not* the printed (…, cos t sin t·σ_d), which would apply σ_d twice.
    """
    cs = torch.cos(t) * torch.sin(t)
    primals = (x_t / sigma_data, t)
    tangents = (append_dims(cs, x_t.ndim) * dxt_dt / sigma_data, cs)
    with torch.no_grad(), attention_op(net, "math"):
        F_minus, J = torch.func.jvp(lambda x_hat, tt: call_net(net, x_hat, tt, class_labels, guidance), primals, tangents)
    return F_minus, J


def fd_tangent(net: nn.Module, x_t: Tensor, t: Tensor, dxt_dt: Tensor, *, sigma_data: float,
               class_labels: Tensor | None = None, guidance: Tensor | None = None, h: float = 1e-4,
               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """The same (F⁻, J) by a central finite difference along the tangent direction, in float64.

    J ≈ [F(p + h·v) − F(p − h·v)]/(2h) with p = (x_t/σ_d, t) and v the JVP's tangent. It is the test oracle for
    :func:`jvp_tangent` and an option for backends without forward-mode AD. Dropout masks are shared between the
    two evaluations by restoring the RNG state.
    """
    cs = (torch.cos(t) * torch.sin(t)).to(dtype)
    x_hat, tt = (x_t / sigma_data).to(dtype), t.to(dtype)
    v_x, v_t = append_dims(cs, x_t.ndim) * dxt_dt.to(dtype) / sigma_data, cs
    params = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in
              {**dict(net.named_parameters()), **dict(net.named_buffers())}.items()}

    def F(x: Tensor, s: Tensor) -> Tensor:
        kwargs = {} if guidance is None else {"guidance": guidance.to(dtype)}
        return torch.func.functional_call(net, params, (x, s, class_labels), kwargs)

    with torch.no_grad():
        rng = _rng_state(x_t.device)
        F_minus = F(x_hat, tt)
        _set_rng_state(x_t.device, rng)
        F_plus = F(x_hat + h * v_x, tt + h * v_t)
        _set_rng_state(x_t.device, rng)
        F_minus_h = F(x_hat - h * v_x, tt - h * v_t)
    J = (F_plus - F_minus_h) / (2 * h)
    return F_minus.to(x_t.dtype), J.to(x_t.dtype)


def _rng_state(device: torch.device) -> tuple:
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def scm_g(F_minus: Tensor, J: Tensor, x_t: Tensor, t: Tensor, dxt_dt: Tensor, *, sigma_data: float, r: float) -> Tensor:
    """The (unnormalised) tangent g = −cos²t·(σ_d F⁻ − dx_t/dt) − r·(cos t sin t·x_t + σ_d·J) (paper Alg. 1).

    At r = 1 this is cos t·df⁻/dt (paper Eq. 6 times the prior weighting's cos t); r is the tangent warmup.
    """
    c = append_dims(torch.cos(t), x_t.ndim)
    s = append_dims(torch.sin(t), x_t.ndim)
    return -c**2 * (sigma_data * F_minus - dxt_dt) - r * (c * s * x_t + sigma_data * J)


def normalize_tangent(g: Tensor, c: float = TANGENT_C, norm: str = "l2") -> Tensor:
    """Tangent normalisation g/(‖g‖ + c) per sample (paper §4.2), or elementwise clipping to [−1, 1].

    ``norm``: ``"l2"`` (L2 over all non-batch dims: Sana, rCM), ``"rms"`` (L2/√D: invariant to the data size;
    xandergos, FastGen), ``"clip"`` (the paper's alternative) or ``"none"``. The paper does not say which norm.
    """
    if norm == "none":
        return g
    if norm == "clip":
        return g.clamp(-1.0, 1.0)
    flat = g.reshape(g.shape[0], -1)
    if norm == "l2":
        n = flat.norm(dim=1)
    elif norm == "rms":
        n = flat.norm(dim=1) / flat.shape[1] ** 0.5
    else:
        raise ValueError(f"tangent norm must be one of 'l2', 'rms', 'clip', 'none', got {norm!r}")
    return g / (append_dims(n, g.ndim) + c)


def tangent_warmup(step: int, H: int) -> float:
    """r = min(1, step/H) (paper §4.2; H = 10k in App. G.2). H = 0 disables the warmup."""
    return 1.0 if H <= 0 else min(1.0, step / H)


@dataclass(frozen=True)
class SCMConfig:
    """Hyperparameters of the sCM objective (paper App. G.2 defaults for CIFAR-10)."""

    sigma_data: float = 0.5
    P_mean: float = -1.0
    P_std: float = 1.4
    c: float = TANGENT_C
    tangent_norm: str = "l2"  # l2 | rms | clip | none
    tangent: str = "jvp"  # jvp | fd
    tangent_warmup_steps: int = 10_000  # H
    prior_weight: bool = False  # an extra outer 1/(σ_d tan t) factor (docs/method.md, "Weighting")
    share_dropout: bool = True  # the JVP pass and the grad pass see the same dropout masks

    def validate(self) -> None:
        check_sigma_data(self.sigma_data)
        if self.P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")
        if self.c < 0:
            raise ValueError(f"c must be >= 0, got {self.c}")
        if self.tangent_norm not in ("l2", "rms", "clip", "none"):
            raise ValueError(f"tangent_norm must be one of 'l2', 'rms', 'clip', 'none', got {self.tangent_norm!r}")
        if self.tangent not in ("jvp", "fd"):
            raise ValueError(f"tangent must be one of 'jvp', 'fd', got {self.tangent!r}")
        if self.tangent_warmup_steps < 0:
            raise ValueError(f"tangent_warmup_steps must be >= 0, got {self.tangent_warmup_steps}")


TANGENTS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {"jvp": jvp_tangent, "fd": fd_tangent}


def scm_loss(net: nn.Module, x0: Tensor, *, cfg: SCMConfig, step: int, teacher: VelocityFn | None = None,
             weight_head: nn.Module | None = None, class_labels: Tensor | None = None,
             generator: torch.Generator | None = None, noise: Noise | None = None,
             tangent_net: nn.Module | None = None, guidance: Tensor | None = None) -> LossOutput:
    """The sCM loss (paper Eq. 8, Alg. 1): sCD when ``teacher`` is given, sCT otherwise.

    L(θ, φ) = E[(e^{w_φ(t)}/D)·‖F_θ(x_t/σ_d, t) − F⁻ − g‖² − w_φ(t)], g normalised. F⁻ = stopgrad(F_θ) with the
    *online* weights (paper §2.2). dx_t/dt is the teacher's velocity σ_d F_teacher (sCD, no grad; pass the teacher's
    EMA weights) or the one-sample estimate cos t·z − sin t·x0 (sCT). Samples whose g or F⁻ is not finite are masked
    out of the loss and counted in ``stats["nonfinite"]``.

    Precision: the network's ``amp_dtype`` (e.g. bf16 on CUDA) autocasts only its grad-enabled forward; the tangent
    is computed in a :func:`scm.nn.float32_region`, and g, the weighting and the loss are float32 (docs/method.md,
    "Precision"). ``tangent_net`` is the module the JVP differentiates when ``net`` is a wrapper that forward-mode AD cannot see through (DistributedDataParallel).
    ``noise`` fixes the batch's randomness (else drawn from ``generator``). ``guidance``: the per-sample guidance
    scale s that ``teacher`` applies (classifier-free guidance, :func:`scm.trigflow.guided_velocity`), fed to the
    student too (paper App. G: sCD on ImageNet 512 samples s ~ U[1, s_max]).
    """
    cfg.validate()
    check_finite(x0, "x0")
    sigma_data = cfg.sigma_data

    # Sample t, noise and x_t (Alg. 1).
    t, z = _t_and_z(x0, noise, cfg.P_mean, cfg.P_std, sigma_data, generator)
    x_t = add_noise(x0, z, t)

    # dx_t/dt: the frozen teacher's PF-ODE velocity (sCD) or the conditional velocity (sCT).
    if teacher is not None:
        with torch.no_grad():
            dxt_dt = teacher(x_t, t).to(x0.dtype)
    else:
        dxt_dt = velocity_target(x0, z, t)

    # F⁻ and the tangent J = cos t sin t·dF⁻/dt, both with the online weights and no grad. With dropout, the JVP
    # pass and the grad pass below draw the same masks: the RNG state is saved here and restored before the latter.
    rng = _rng_state(x0.device) if cfg.share_dropout else None
    with float32_region(x0):
        F_minus, J = TANGENTS[cfg.tangent](tangent_net or net, x_t, t, dxt_dt, sigma_data=sigma_data,
                                           class_labels=class_labels, guidance=guidance)

    # g, warmed up and normalised (Alg. 1; §4.2).
    r = tangent_warmup(step, cfg.tangent_warmup_steps)
    g = scm_g(F_minus.float(), J.float(), x_t.float(), t.float(), dxt_dt.float(), sigma_data=sigma_data, r=r)
    g_norm = g.reshape(g.shape[0], -1).norm(dim=1)
    g = normalize_tangent(g, cfg.c, cfg.tangent_norm)

    # Mask samples whose tangent is not finite (the known sCM failure mode) instead of poisoning the batch.
    finite = torch.isfinite(g.reshape(g.shape[0], -1)).all(dim=1)
    g = torch.where(append_dims(finite, g.ndim), g, torch.zeros_like(g))

    # The grad-enabled forward and the loss: F_θ − stopgrad(F_θ) is 0 in value, so the gradient is −g·∂F/∂θ.
    if rng is not None:
        _set_rng_state(x0.device, rng)
    F = call_net(net, x_t / sigma_data, t, class_labels, guidance).float()
    sq_err = _mean_dims((F - F.detach() - g) ** 2)
    w = weight_head(t) if weight_head is not None else None
    per_sample = adaptive_weighted(sq_err, w)
    if cfg.prior_weight:
        per_sample = per_sample / (sigma_data * torch.tan(t))
    per_sample = torch.where(finite, per_sample, torch.zeros_like(per_sample))
    loss = per_sample.sum() / finite.sum().clamp(min=1)

    stats = {"g_norm": g_norm[finite].mean().item() if finite.any() else float("nan"),
             "r": r, "nonfinite": int((~finite).sum().item()), "mse": sq_err[finite].mean().item() if finite.any() else float("nan")}
    if w is not None:
        stats["w_mean"] = w.detach().mean().item()
    return LossOutput(loss, per_sample.detach(), t, stats)


# ---------------------------------------------------------------------------------------------------------------
# One optimiser step, shared by teacher and student training.


def optimizer_step(loss: Tensor, params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None = None) -> tuple[float, bool]:
    """Back-propagate, and step only if the gradient norm is finite (Sana, rCM). Returns (grad_norm, stepped)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return step_if_finite(params, optimizer, max_grad_norm)


def step_if_finite(params: list[nn.Parameter], optimizer: torch.optim.Optimizer,
                   max_grad_norm: float | None = None) -> tuple[float, bool]:
    """Step on the gradients already accumulated, only if their norm is finite; else drop them. (grad_norm, stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), False
    optimizer.step()
    return float(grad_norm), True
