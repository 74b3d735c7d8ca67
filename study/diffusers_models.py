"""Teachers in diffusers format: a ``UNet2DModel`` and its discrete scheduler as a TrigFlow network F(x̂, t).

``teacher.source`` may name a diffusers model directory (``config.json`` of a ``UNet2DModel`` beside a
``scheduler_config.json``, or a pipeline folder with ``unet/`` and ``scheduler/``) or a Hugging Face hub id
(``google/ddpm-cifar10-32``, with ``teacher.revision``). :func:`load_teacher` turns it into :class:`TrigFlowUNet2D`:

- the scheduler's ᾱ_i (DDPM/DDIM betas: ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, given ``trained_betas``,
  zero-terminal-SNR rescaling) become a :class:`scm.schedules.DiscreteSchedule`, queried at fractional timesteps by
  log-SNR interpolation, never rounded (a rounded timestep makes ∂/∂t zero and the sCM tangent meaningless);
- ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample`` selects the conversion of
  :func:`scm.trigflow.alpha_sigma_teacher` (paper Eq. 29); ``teacher.data_scale`` says how the model's data relate
  to the project's (x0_model = data_scale·x0);
- every attention block gets :class:`MathAttnProcessor` (softmax written out), because PyTorch's fused attention
  has no forward-mode AD on CPU and diffusers' ``AttnProcessor`` gives a wrong JVP (measured against finite
  differences in the tests).

The student of such a teacher is the same wrapper (sCD copies the teacher, App. G.2), trained through the adapter:
its output stays a TrigFlow F = σ_d⁻¹·velocity, so at step 0 the student *is* the teacher, and the sCM loss, samplers
and export see an ordinary F_θ. Training the raw ``UNet2DModel`` to output F directly would start from a network
whose output means ε, far from the teacher's map.

Model files. :func:`describe` and :func:`build` are the model-file format's (``study.models``) second network kind,
``diffusers-unet2d``: the UNet2DModel's config, ᾱ_i, the prediction type and the data scale in the safetensors
metadata, the weights under ``unet.``; nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scm.schedules import DiscreteSchedule
from scm.trigflow import alpha_sigma_teacher
from study.errors import StageError

KIND = "diffusers-unet2d"
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}  # diffusers' prediction_type -> scm's


class MathAttnProcessor:
    """diffusers' self-attention of a ``UNet2DModel`` block, with the softmax written out: forward-mode AD is right."""

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("MathAttnProcessor: only the self-attention of UNet2DModel blocks is supported")
        residual = hidden_states
        b, c, h, w = hidden_states.shape
        x = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = (attn.head_to_batch_dim(f(x)) for f in (attn.to_q, attn.to_k, attn.to_v))
        probs = (torch.bmm(q, k.transpose(1, 2)) * attn.scale).softmax(dim=-1)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
        out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def forward_ad_ready(unet: nn.Module) -> nn.Module:
    """Give every attention block of ``unet`` the :class:`MathAttnProcessor`."""
    from diffusers.models.attention_processor import Attention

    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(MathAttnProcessor())
    return unet


class TrigFlowUNet2D(nn.Module):
    """F(x̂, t, class_labels) of a diffusers ``UNet2DModel`` on a discrete schedule: σ_d·F(x_t/σ_d, t) is the
    model's PF-ODE velocity in TrigFlow (:func:`scm.trigflow.alpha_sigma_teacher`)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor | list[float], prediction: str, data_scale: float,
                 sigma_data: float):
        super().__init__()
        if prediction not in PREDICTIONS.values():
            raise ValueError(f"prediction must be one of {sorted(PREDICTIONS.values())}, got {prediction!r}")
        self.unet = forward_ad_ready(unet)
        self.schedule = DiscreteSchedule(alphas_cumprod)
        self.prediction, self.data_scale, self.sigma_data = prediction, float(data_scale), float(sigma_data)

    def forward(self, x_hat: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        model = lambda x_prime, tau: self.unet(x_prime, tau, class_labels=class_labels).sample
        velocity = alpha_sigma_teacher(model, self.sigma_data, prediction=self.prediction, alpha=self.schedule.alpha,
                                       sigma=self.schedule.sigma, time_from_ratio=self.schedule.timestep,
                                       data_scale=self.data_scale)
        return velocity(self.sigma_data * x_hat, t) / self.sigma_data


# ---------------------------------------------------------------------------------------------------------------
# teacher.source: ddpm. A UNet2DModel trained here with diffusers' own DDPM recipe (the teacher of the digits-ddpm
# profile): integer timesteps drawn uniformly, DDPMScheduler.add_noise, ε-MSE.

DDPM_TIMESTEPS = 1000


def ddpm_unet(scale: str, data_shape: tuple[int, ...], dropout: float = 0.0, width: int = 0) -> nn.Module:
    """A ``UNet2DModel`` of the widths of the project's scale ``scale`` (:data:`scm.scales.SCALES`); ``width`` > 0
    replaces its base width."""
    from diffusers import UNet2DModel

    from scm.scales import SCALES

    s = SCALES[scale]
    widths = [(width or s.model_channels) * m for m in s.channel_mult]
    factor = 2 ** (len(widths) - 1)
    if any(n % factor for n in data_shape[1:]):
        raise StageError(f"teacher.source='ddpm': a UNet2DModel of scale {scale} halves the resolution "
                         f"{len(widths) - 1} time(s) and needs sizes divisible by {factor}, but the latents are "
                         f"{data_shape[1]}×{data_shape[2]} (change data.image_size or encode.channels)")
    down = ["AttnDownBlock2D" if i in s.attn_levels else "DownBlock2D" for i in range(len(widths))]
    up = ["AttnUpBlock2D" if i in s.attn_levels else "UpBlock2D" for i in reversed(range(len(widths)))]
    return UNet2DModel(sample_size=tuple(data_shape[1:]), in_channels=data_shape[0], out_channels=data_shape[0],
                       block_out_channels=tuple(widths), layers_per_block=s.num_blocks, down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=8, attention_head_dim=widths[-1] // s.num_heads,
                       dropout=dropout)


def ddpm_scheduler() -> Any:
    """DDPM's schedule: 1,000 linear betas from 1e-4 to 0.02, ε-prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=DDPM_TIMESTEPS, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon")


def ddpm_loss(unet: nn.Module, scheduler: Any, x0: Tensor, noise: Any) -> Any:
    """diffusers' DDPM training objective E‖ε_θ(√ᾱ_i x0 + √(1−ᾱ_i) ε, i) − ε‖², i uniform on 0 … T−1.

    ``noise`` is the training loop's :class:`scm.losses.Noise`: its normal ``u`` becomes the uniform timestep through
    the normal CDF, its ``eps`` is ε, so the loop's seeding and data parallelism apply unchanged.
    """
    from scm.losses import LossOutput

    T = scheduler.config.num_train_timesteps
    timesteps = (torch.special.ndtr(noise.u.to(torch.float64)) * T).long().clamp(0, T - 1).to(x0.device)
    eps = noise.eps.to(x0.dtype)
    noisy = scheduler.add_noise(x0, eps, timesteps)
    sq_err = ((unet(noisy, timesteps).sample.float() - eps) ** 2).reshape(len(x0), -1).mean(dim=1)
    return LossOutput(sq_err.mean(), sq_err.detach(), timesteps.to(x0.dtype), {"mse": sq_err.mean().item()})


# ---------------------------------------------------------------------------------------------------------------
# The model-file format's second kind.


def describe(net: TrigFlowUNet2D) -> dict[str, Any]:
    """The JSON description of ``net`` (everything but the weights)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(net.unet.config).items()
              if k in ("_class_name", "_diffusers_version") or not k.startswith("_")}  # not _name_or_path
    return {"kind": KIND, "unet2d": json.loads(json.dumps(config)), "alphas_cumprod": net.schedule.alphas_cumprod.tolist(),
            "prediction": net.prediction, "data_scale": net.data_scale, "sigma_data": net.sigma_data}


def build(info: dict[str, Any]) -> TrigFlowUNet2D:
    """The network :func:`describe` described (random weights; on the current default device)."""
    from diffusers import UNet2DModel

    config = {k: v for k, v in info["unet2d"].items() if not k.startswith("_")}
    unet = UNet2DModel.from_config(config)
    return TrigFlowUNet2D(unet, info["alphas_cumprod"], info["prediction"], info["data_scale"], info["sigma_data"])


# ---------------------------------------------------------------------------------------------------------------
# teacher.source: a diffusers directory or hub id.


def find_model_dirs(path: Path) -> tuple[Path, Path] | None:
    """(the UNet2DModel's directory, the scheduler config file) of a diffusers model or pipeline folder, or None."""
    for unet_dir, scheduler in ((path, path / "scheduler_config.json"),
                                (path / "unet", path / "scheduler" / "scheduler_config.json")):
        if (unet_dir / "config.json").is_file():
            return unet_dir, scheduler
    return None


def is_diffusers_source(source: str) -> bool:
    """Whether ``teacher.source`` names a diffusers model: a folder of one, or a hub id (owner/name) not on disk."""
    path = Path(source)
    if path.exists():
        return path.is_dir() and find_model_dirs(path) is not None
    return (not source.startswith((".", "/", "http://", "https://", "models:/", "runs:/")) and source.count("/") == 1
            and all(part.strip() for part in source.split("/")))


def load_teacher(source: str, revision: str, *, data_shape: tuple[int, ...], sigma_data: float, data_scale: float,
                 who: str) -> TrigFlowUNet2D:
    """The diffusers model named by ``source`` as a TrigFlow teacher for data of ``data_shape``; errors begin with
    ``who`` (``teacher.source='...'``)."""
    from diffusers import DDPMScheduler, UNet2DModel

    from study.fetch import hub_snapshot

    folder = Path(source) if Path(source).exists() else hub_snapshot(
        source, revision, ["*.json", "*.safetensors"], who=who)
    found = find_model_dirs(folder)
    if found is None:
        raise StageError(f"{who}: not a diffusers model (no config.json, nor unet/config.json)")
    unet_dir, scheduler_file = found
    config = _read_json(unet_dir / "config.json", who)
    if config.get("_class_name") != "UNet2DModel":
        raise StageError(f"{who}: a {config.get('_class_name')!r}, but only UNet2DModel teachers are supported")
    if not scheduler_file.is_file():
        raise StageError(f"{who}: no scheduler config ({scheduler_file.relative_to(folder)}) beside the UNet2DModel")
    scheduler = _read_json(scheduler_file, who)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise StageError(f"{who}: prediction_type {prediction!r} is not supported (accepted: {', '.join(PREDICTIONS)})")

    # The model must fit the data: channels and size.
    channels, height, width = data_shape
    size = config.get("sample_size")
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    if (config.get("in_channels"), config.get("out_channels")) != (channels, channels) or size != (height, width):
        raise StageError(f"{who}: the model takes {config.get('in_channels')}×{size[0]}×{size[1]} samples "
                         f"({config.get('out_channels')} output channels), but the data are {channels}×{height}×{width}")
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True, low_cpu_mem_usage=False)
        schedule = DDPMScheduler.from_config({k: v for k, v in scheduler.items() if not k.startswith("_")})
    except (OSError, ValueError, NotImplementedError, EnvironmentError) as e:
        raise StageError(f"{who}: cannot load the model ({(str(e).strip().splitlines() or [''])[0][:300]})") from None
    try:
        return TrigFlowUNet2D(unet.eval(), schedule.alphas_cumprod, PREDICTIONS[prediction], data_scale, sigma_data)
    except ValueError as e:
        raise StageError(f"{who}: {e}") from None


def _read_json(path: Path, who: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StageError(f"{who}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise StageError(f"{who}: {path.name} is not a JSON object")
    return value
