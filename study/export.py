"""A distilled student as a diffusers pipeline: ``DiffusionPipeline.from_pretrained(dir)`` returns its images.

The directory :func:`export_pipeline` writes is a standard diffusers pipeline folder:

- ``unet/``: :class:`SCMUNet2DModel`, the project's U-Net F_θ as a diffusers ``ModelMixin`` (config + safetensors
  weights), or :class:`SCMTrigFlowUNet2DModel` for a student of a diffusers teacher. Its output is the TrigFlow velocity σ_d·F_θ(x_t/σ_d, t) (paper Eq. 3), the ``model_output`` that
  diffusers' ``SCMScheduler`` (``prediction_type="trigflow"``) turns into x̂0 = cos t·x_t − sin t·σ_d F_θ (Eq. 5).
- ``scheduler/``: ``SCMScheduler`` with the student's σ_d.
- ``vae/``: the codec's AutoencoderKL, for latent models (absent for pixel models).
- ``model_index.json``: the pipeline class ``["scm_pipeline", "SCMPipeline"]`` and the codec's per-channel latent
  statistics, image shape and the 2-step sampler's t_mid; ``scm_pipeline.py`` is one import line that points
  diffusers at :class:`SCMPipeline` in this installed project. diffusers runs a directory's own module only when
  asked to: ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``. :func:`load_pipeline` builds the
  same pipeline from the weights and configs alone, running nothing from the directory.

Times. The pipeline samples at the project's times (:func:`scm.samplers.consistency_times`): t_max = arctan(σ_max/σ_d)
for 1 step, [t_max, t_mid] for 2, then evenly down from t_mid; it hands them to ``SCMScheduler.set_timesteps`` as
custom timesteps (with ``max_timesteps=None, intermediate_timesteps=None``, which that API needs for any step count
other than its built-in 2-step default).

Seeds. ``pipe(seeds=[...])`` draws the noise exactly as the sample stage does (image i's noise from its own seed,
:func:`scm.samplers.noise_from_seeds`), and re-noises between steps with that noise too; called on the sample stage's
batches, its images equal the sample stage's bit for bit on CPU (other batches can move a pixel by one gray level
through the VAE: :mod:`study.sampling`). ``pipe(batch_size=n, generator=g)`` is the diffusers convention: the
initial noise from ``g`` and ``SCMScheduler.step`` drawing the rest.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers import SCMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor

from scm import networks
from scm import nn as scm_nn
from scm import samplers
from scm.constants import T_MID
from scm.trigflow import velocity
from study import diffusers_models
from study.codec import Codec, load_codec
from study.errors import StageError
from study.files import atomic_output_dir
from study.models import load_model

# diffusers finds a component's load method by looking these base classes up in the component's module (this one).
LOADABLE_BASES = (ModelMixin, SchedulerMixin)
PIPELINE_MODULE = "scm_pipeline"  # the one-line module diffusers imports from the exported directory
PIPELINE_FILE = f"{PIPELINE_MODULE}.py"


class SCMUNetOutput(BaseOutput):
    sample: Tensor


class SCMUNet2DModel(ModelMixin, ConfigMixin):
    """The project's U-Net (:class:`scm.nn.UNet`) as a diffusers model whose output is σ_d·F_θ(x_t/σ_d, t).

    ``forward(sample, timestep)``: ``sample`` is x_t (std σ_d at t = π/2), ``timestep`` the TrigFlow time t ∈ [0, π/2]
    (a float, or one per sample); ``class_labels`` for class-conditional networks.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, model_channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
                 num_blocks: int = 1, attn_levels: tuple[int, ...] = (), num_heads: int = 1, dropout: float = 0.0,
                 num_classes: int = 0, groups: int = 8, guidance_embedding: bool = False, sigma_data: float = 0.5):
        super().__init__()
        cfg = scm_nn.UNetConfig(in_channels=in_channels, model_channels=model_channels,
                                channel_mult=tuple(channel_mult), num_blocks=num_blocks, attn_levels=tuple(attn_levels),
                                num_heads=num_heads, dropout=dropout, num_classes=num_classes, groups=groups,
                                guidance_embedding=guidance_embedding)
        self.net = scm_nn.UNet(cfg)

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional network (0: unconditional)."""
        return int(self.config.num_classes)

    def forward(self, sample: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None,
                guidance: Tensor | float | None = None, return_dict: bool = True) -> SCMUNetOutput | tuple[Tensor]:
        """σ_d·F_θ(x_t/σ_d, t) (Eq. 3); ``guidance``: the scale s of a student distilled with guidance (sCD)."""
        t = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device)
        t = t.expand(sample.shape[0]) if t.ndim == 0 else t  # (N,)
        if guidance is None:
            v = velocity(self.net, sample, t, self.config.sigma_data, class_labels)
        else:
            if not networks.has_guidance_embedding(self.net):
                raise ValueError("guidance: this student has no guidance input (it was distilled without guidance)")
            s = torch.as_tensor(guidance, dtype=sample.dtype, device=sample.device).expand(sample.shape[0])
            v = self.config.sigma_data * self.net(sample / self.config.sigma_data, t, class_labels, guidance=s)
        return SCMUNetOutput(sample=v) if return_dict else (v,)

    @property
    def guidance_embedding(self) -> bool:
        """Whether the student takes a guidance scale (``forward(..., guidance=s)``)."""
        return networks.has_guidance_embedding(self.net)


class SCMTrigFlowUNet2DModel(ModelMixin, ConfigMixin):
    """A student distilled from a diffusers ``UNet2DModel`` teacher (:class:`study.diffusers_models.TrigFlowUNet2D`:
    the UNet2DModel behind its discrete-schedule adapter) as a diffusers model whose output is σ_d·F_θ(x_t/σ_d, t),
    like :class:`SCMUNet2DModel`."""

    @register_to_config
    def __init__(self, unet2d: dict | None = None, alphas_cumprod: list[float] | None = None, prediction: str = "eps",
                 data_scale: float = 1.0, sigma_data: float = 0.5):
        super().__init__()
        from study.diffusers_models import build

        self.net = build({"unet2d": unet2d, "alphas_cumprod": alphas_cumprod, "prediction": prediction,
                          "data_scale": data_scale, "sigma_data": sigma_data})

    forward = SCMUNet2DModel.forward
    guidance_embedding = SCMUNet2DModel.guidance_embedding

    @property
    def num_classes(self) -> int:
        return int(self.config.unet2d.get("num_class_embeds") or 0)


class SCMNetworkModel(ModelMixin, ConfigMixin):
    """A student of EDM2's U-Net or DDPM++ (:mod:`scm.networks`: ``kind`` and its ``network`` config) as a diffusers
    model whose output is σ_d·F_θ(x_t/σ_d, t), like :class:`SCMUNet2DModel`."""

    @register_to_config
    def __init__(self, kind: str = "mpunet", network: dict | None = None, sigma_data: float = 0.5):
        super().__init__()
        self.net = networks.build(networks.from_plain(kind, network or {}))

    forward = SCMUNet2DModel.forward
    guidance_embedding = SCMUNet2DModel.guidance_embedding

    @property
    def num_classes(self) -> int:
        return int(self.net.cfg.num_classes)


STUDENT_MODELS = {cls.__name__: cls for cls in (SCMUNet2DModel, SCMTrigFlowUNet2DModel, SCMNetworkModel)}


class SCMPipeline(DiffusionPipeline):
    """1-, 2- or M-step sampling of an sCM student (paper §5.2), decoded by its codec.

    ``pipe(seeds=[0, 1, 2], num_inference_steps=2)`` gives the sample stage's images of those seeds; a
    class-conditional student takes ``class_labels`` (the sample stage's: :func:`scm.samplers.labels_from_seeds`) and,
    distilled with guidance, ``guidance_scale`` (its s; the network's default s = 1 when None).
    ``output_type``: ``"pil"`` (PIL images), ``"pt"`` (uint8 N×C×H×W, what the sample stage stores) or ``"np"``
    (float N×H×W×C in [0, 1], diffusers' convention).
    """

    _optional_components = ["vae"]
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: SCMUNet2DModel, scheduler: SCMScheduler, vae: Any = None,
                 image_shape: list[int] | None = None, latent_mean: list[float] | None = None,
                 latent_std: list[float] | None = None, t_mid: float = T_MID):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(image_shape=image_shape, latent_mean=latent_mean, latent_std=latent_std, t_mid=t_mid)

    def codec(self) -> Codec:
        """The codec of the encode stage, rebuilt from the pipeline's parts: its ``decode`` is the sample stage's."""
        c = self.config
        device = self.unet.device
        return Codec(self.vae, tuple(c.image_shape), torch.tensor(c.latent_mean, dtype=torch.float32, device=device),
                     torch.tensor(c.latent_std, dtype=torch.float32, device=device), self.unet.config.sigma_data)

    def times(self, num_inference_steps: int, t_mid: float | None = None) -> list[float]:
        """The sampling times t_max, …, then 0 (:func:`scm.samplers.consistency_times`)."""
        sigma_data = self.unet.config.sigma_data
        ts = samplers.consistency_times(num_inference_steps, sigma_data, self.config.t_mid if t_mid is None else t_mid)
        return ts + [0.0]

    @torch.no_grad()
    def __call__(self, seeds: list[int] | None = None, batch_size: int = 1, num_inference_steps: int = 2,
                 t_mid: float | None = None, class_labels: Tensor | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ImagePipelineOutput | tuple:
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        codec = self.codec()
        sigma_data = self.unet.config.sigma_data
        device = self.unet.device
        ts = self.times(num_inference_steps, t_mid)
        self.scheduler.set_timesteps(num_inference_steps, timesteps=ts, device=device, max_timesteps=None,
                                     intermediate_timesteps=None)
        shape = tuple(codec.latent_shape)
        if seeds is not None:  # the project's noise: image i from seed i alone
            noise = samplers.noise_from_seeds(seeds, shape, num_inference_steps, sigma_data=sigma_data, device=device)
        else:
            noise = [randn_tensor((batch_size, *shape), generator=generator, device=device) * sigma_data]
        if class_labels is not None:
            class_labels = class_labels.to(device)

        x = noise[0]
        for i, s in enumerate(self.scheduler.timesteps[:-1]):
            model_output = self.unet(x, s, class_labels, guidance_scale).sample  # σ_d·F_θ(x_s/σ_d, s[, guidance])
            out = self.scheduler.step(model_output, s, x, generator=generator)
            if seeds is None or i == num_inference_steps - 1:
                x = out.prev_sample  # the last step's prev_sample is x̂0 (t = 0)
            else:  # re-noise x̂0 to the next time with this image's own noise: x_t = cos t·x̂0 + sin t·z
                t = self.scheduler.timesteps[i + 1]
                x = torch.cos(t) * out.pred_original_sample + torch.sin(t) * noise[i + 1]
        images = codec.decode(x).cpu()  # uint8 N×C×H×W

        if output_type == "pt":
            result: Any = images
        else:
            array = images.permute(0, 2, 3, 1).numpy()
            result = array.astype("float32") / 255 if output_type == "np" else [_to_pil(a) for a in array]
        return ImagePipelineOutput(images=result) if return_dict else (result,)


def _to_pil(array: Any) -> Any:
    from PIL import Image

    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


# ---------------------------------------------------------------------------------------------------------------
# Writing a pipeline directory.


def build_pipeline(student_dir: Path, latents_dir: Path, *, t_mid: float = T_MID, name: str | None = None) -> SCMPipeline:
    """The student in ``student_dir`` (a model file or its directory) and the codec in ``latents_dir`` as one
    :class:`SCMPipeline`, in memory. Errors begin with ``name`` (default: the student's path)."""
    net, meta = load_model(student_dir, name=name)
    codec = load_codec(latents_dir)
    if list(meta.get("latent_shape", [])) != list(codec.latent_shape):
        raise StageError(f"{name or student_dir}: a model of latent shape {meta.get('latent_shape')}, but the codec in "
                         f"{latents_dir} makes {list(codec.latent_shape)}")
    sigma_data = float(meta["sigma_data"])
    if isinstance(net, diffusers_models.TrigFlowUNet2D):
        described = diffusers_models.describe(net)
        unet = SCMTrigFlowUNet2DModel(**{k: described[k] for k in ("unet2d", "alphas_cumprod", "prediction", "data_scale",
                                                                   "sigma_data")})
    elif isinstance(net, scm_nn.UNet):
        unet = SCMUNet2DModel(**asdict(net.cfg), sigma_data=sigma_data)
    else:
        plain = networks.to_plain(net)
        unet = SCMNetworkModel(kind=plain["kind"], network=plain["config"], sigma_data=sigma_data)
    unet.net.load_state_dict(net.state_dict())
    return SCMPipeline(unet=unet.eval(), scheduler=SCMScheduler(sigma_data=sigma_data), vae=codec.vae,
                       image_shape=list(codec.image_shape), latent_mean=codec.mean.tolist(),
                       latent_std=codec.std.tolist(), t_mid=float(t_mid))


def export_pipeline(student_dir: Path, latents_dir: Path, out_dir: Path, *, t_mid: float = T_MID) -> dict[str, Any]:
    """Write the student in ``student_dir`` and the codec in ``latents_dir`` as a diffusers pipeline in ``out_dir``.

    Written whole or not at all (:func:`study.files.atomic_output_dir`). Returns what ``model_index.json`` says.
    """
    pipe = build_pipeline(student_dir, latents_dir, t_mid=t_mid)
    with atomic_output_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, "SCMPipeline"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / PIPELINE_FILE).write_text('"""The sCM pipeline of the installed sCM project (study.export)."""\n'
                                         "from study.export import SCMPipeline  # noqa: F401\n")
    return index


def load_pipeline(path: Path, device: str = "cpu") -> SCMPipeline:
    """An exported directory as :class:`SCMPipeline`, built from its parts: safetensors weights and JSON configs only,
    nothing from the directory is executed (unlike ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)``,
    which imports its ``scm_pipeline.py``)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    index_path = path / "model_index.json"
    if not index_path.is_file():
        raise StageError(f"{path}: not an exported pipeline directory (no model_index.json)")
    try:
        index = json.loads(index_path.read_text())
        if index.get("_class_name") != [PIPELINE_MODULE, "SCMPipeline"]:
            raise ValueError(f"model_index.json names the pipeline {index.get('_class_name')!r}, not an sCM export")
        kw = dict(use_safetensors=True, low_cpu_mem_usage=False)
        model_cls = STUDENT_MODELS.get(index.get("unet", [None, None])[1])
        if model_cls is None:
            raise ValueError(f"model_index.json names the network {index.get('unet')!r}, not an sCM student")
        unet = model_cls.from_pretrained(path / "unet", **kw)
        scheduler = SCMScheduler.from_pretrained(path / "scheduler")
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw) if (path / "vae").is_dir() else None
        pipe = SCMPipeline(unet=unet, scheduler=scheduler, vae=vae, image_shape=index["image_shape"],
                           latent_mean=index["latent_mean"], latent_std=index["latent_std"], t_mid=index["t_mid"])
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise StageError(f"{path}: cannot load the exported pipeline ({(str(e).splitlines() or [''])[0][:300]})") from None
    return pipe.to(device)
