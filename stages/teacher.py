"""Teacher stage (per scale): a TrigFlow diffusion model on the latents, trained here or fetched.

Consumes ``data/latents`` (encode stage). Produces ``artifacts/<scale>/teacher/model.safetensors`` (the EMA weights,
self-describing) with ``resolved_params.json``, the metrics file ``metrics/<scale>/teacher.json`` and the training
curve ``plots/<scale>/teacher_history.csv``.

``teacher.source: ddpm`` trains a diffusers ``UNet2DModel`` with diffusers' own DDPM recipe instead, writes it with
``save_pretrained`` beside the model file (``diffusers/``) and converts it like an imported one. Other sources fetch
a model file (a path, an https URL with its sha256, an MLflow model) or convert a diffusers ``UNet2DModel`` (a
directory or hub id, :mod:`study.diffusers_models`) into the model-file format, behind its TrigFlow adapter.

Training follows the paper's teacher recipe at CPU size: the TrigFlow diffusion loss (Eq. 4) with the log-normal
proposal and adaptive weighting, Adam with a short learning-rate warm-up, EMA weights for everything downstream.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from scm import networks
from scm.losses import diffusion_loss, drop_labels
from scm.scales import SCALES
from study import diffusers_models, distributed
from study.checkpoint import checkpoint_root, run_checkpointer
from study.cli import add_params_args, add_training_args, cli, load_args
from study.errors import StageError
from study.fetch import fetch
from study.files import atomic_output_dir, check_paths, redact, write_json, write_provenance
from study.latents import Latents, load_latents
from study.models import MODEL_FILE, build_net, load_model, save_model
from study.params import BaseParams, TeacherParams, to_plain
from study.runtime import amp_dtype
from study.training import TrainSpec, make_optimizer, train, write_history


DIFFUSERS_DIR = "diffusers"  # teacher.source: ddpm also writes the UNet2DModel and its scheduler here


def diffusers_teacher(params: TeacherParams, base: BaseParams, data: Latents, scale: str) -> torch.nn.Module:
    """A diffusers UNet2DModel teacher as a TrigFlow network (:mod:`study.diffusers_models`) for these latents.

    Its data are ``teacher.data_scale`` × the codec's output (pixels in [-1, 1], or raw VAE latents); the latents here
    are that output standardised, x0 = (x − μ)·σ_d/σ, so the adapter's scale is data_scale·σ/σ_d, which exists only
    when the standardisation is one scalar: μ = 0 and one σ for every channel (``encode.latent_mean``/``latent_std``).
    """
    who = f"teacher.source={redact(params.source)!r}"
    mean, std = data.codec.get("mean", []), data.codec.get("std", [])
    if any(m != 0 for m in mean) or len(set(std)) != 1:
        raise StageError(f"{who}: a diffusers teacher needs one scalar data scaling; set encode.latent_mean to 0 and "
                         f"encode.latent_std to one value for every channel (the codec has mean {mean}, std {std})")
    return diffusers_models.load_teacher(params.source, params.revision, data_shape=tuple(data.shape),
                                         sigma_data=base.sigma_data, data_scale=params.data_scale * std[0] / base.sigma_data,
                                         who=who)


def conditioning(base: BaseParams, params: TeacherParams, data: Latents) -> int:
    """The number of classes the teacher is conditioned on: the data's with ``base.conditional``, else 0."""
    if not base.conditional:
        return 0
    if data.num_classes < 2:
        raise StageError(f"base.conditional: the data has {data.num_classes} class; conditioning needs at least 2")
    if params.source == "ddpm" or diffusers_models.is_diffusers_source(params.source):
        raise StageError(f"base.conditional: teacher.source={redact(params.source)!r} is an unconditional diffusers "
                         "UNet2DModel here; class-conditional teachers are trained (teacher.source: train) or model files")
    return data.num_classes


def run(params: TeacherParams, base: BaseParams, scale: str, latents_dir: Path, out_dir: Path,
        metrics_path: Path, history_path: Path, *, device: str = "cpu", progress: bool = True,
        dist: distributed.Dist = distributed.SINGLE, checkpoint_root: Path | None = None) -> dict[str, Any] | None:
    """Train (or fetch) the teacher of ``scale``; write its EMA weights and metrics (rank 0; other ranks get None).

    With ``checkpoint_root``, training checkpoints go to ``checkpoint_root/teacher-<scale>`` and a re-run resumes.
    """
    start = time.perf_counter()
    if scale not in SCALES:
        raise StageError(f"scale {scale!r}: unknown (accepted: {', '.join(SCALES)})")
    params = params.at(scale)  # per-scale values (teacher.steps: {S: ..., M: ...}) for this scale
    data = load_latents(latents_dir)
    num_classes = conditioning(base, params, data)
    result, ckpt = None, None
    if params.source == "train":
        # A fresh network from the seed; the diffusion loss (paper Eq. 4); the optimiser of teacher.optimizer.
        # Conditional: each label becomes "no label" with probability teacher.label_dropout (CFG's other branch).
        torch.manual_seed(base.seed)
        net = build_net(scale, data.shape, params.dropout, params.dropout_levels, width=base.width,
                        num_classes=num_classes, name="teacher").to(device)
        net.amp_dtype = amp_dtype(base.precision, device)
        spec = TrainSpec(
            name=f"teacher-{scale}", section="teacher", settings=params, seed=base.seed,
            objective=lambda net_dp, head_dp: lambda step, x0, noise, labels=None: diffusion_loss(
                net_dp, x0, sigma_data=base.sigma_data, P_mean=params.P_mean, P_std=params.P_std, weight_head=head_dp,
                class_labels=None if labels is None else drop_labels(labels, noise.c, params.label_dropout, num_classes),
                noise=noise),
            optimizer=make_optimizer(params))
    elif params.source == "ddpm":
        if params.dropout_levels:
            raise StageError("teacher.dropout_levels: teacher.source 'ddpm' (a UNet2DModel) drops out everywhere; leave it []")
        # diffusers' DDPM recipe on a UNet2DModel of this scale's widths: the data scaled to unit variance
        # (x0/σ_d), integer timesteps, DDPMScheduler.add_noise, ε-MSE; Adam.
        torch.manual_seed(base.seed)
        net = diffusers_models.ddpm_unet(scale, data.shape, params.dropout, base.width).to(device)
        scheduler = diffusers_models.ddpm_scheduler()
        spec = TrainSpec(
            name=f"teacher-{scale}", section="teacher", settings=params, seed=base.seed,
            objective=lambda net_dp, head_dp: lambda step, x0, noise: diffusers_models.ddpm_loss(
                net_dp, scheduler, x0 / base.sigma_data, noise),
            optimizer=make_optimizer(params))
    if params.source in ("train", "ddpm"):
        ckpt = run_checkpointer(checkpoint_root, spec.name, params.checkpoint_every, stage="teacher", params=params,
                                base=base, inputs=[Path(latents_dir) / "latents.safetensors"])
        x0, labels, posterior_std = data.training_set(base.train_split)
        result = train(net, spec, x0, labels=labels if num_classes else None, posterior_std=posterior_std,
                       dist=dist, checkpoint=ckpt, progress=progress)
    if not dist.is_main:
        return None
    meta = {"role": "teacher", "scale": scale, "latent_shape": list(data.shape), "sigma_data": base.sigma_data}
    converted = None
    if result is None and diffusers_models.is_diffusers_source(params.source):
        converted = diffusers_teacher(params, base, data, scale)
    with atomic_output_dir(out_dir) as tmp:
        if result is not None and params.source == "ddpm":
            # The diffusers folder (save_pretrained) and, from it, the TrigFlow teacher the later stages load.
            result.ema.net.save_pretrained(tmp / DIFFUSERS_DIR, safe_serialization=True)
            scheduler.save_pretrained(tmp / DIFFUSERS_DIR)
            converted = diffusers_models.load_teacher(str(tmp / DIFFUSERS_DIR), "", data_shape=tuple(data.shape),
                                                      sigma_data=base.sigma_data, data_scale=1 / base.sigma_data,
                                                      who="teacher.source='ddpm'")
            save_model(tmp / MODEL_FILE, converted, {**meta, "source": "ddpm"})
        elif result is not None:
            save_model(tmp / MODEL_FILE, result.ema.net, meta)
        elif converted is not None:
            save_model(tmp / MODEL_FILE, converted, {**meta, "source": redact(params.source), "revision": params.revision})
        else:
            fetch(params.source, params.sha256, tmp / MODEL_FILE)
            fetched, _ = load_model(tmp, expect_shape=data.shape, expect_scale=scale,  # refuse another scale/shape
                                    name=f"teacher.source={redact(params.source)!r}")
            if networks.num_classes(fetched) != num_classes:
                raise StageError(f"teacher.source={redact(params.source)!r}: a model of "
                                 f"{networks.num_classes(fetched)} classes, but the study has {num_classes} "
                                 f"(base.conditional: {str(base.conditional).lower()})")
        _, meta = load_model(tmp)
        write_provenance(tmp, {"base": to_plain(base), "teacher": to_plain(params), "scale": scale,
                               "latents": str(latents_dir), "device": device, "world_size": dist.world_size},
                         seconds={"train": result.seconds} if result is not None else None)
        # The metrics and the curve last, still inside: if either cannot be written, the old model stays too.
        history = result.history if result is not None else []
        metrics = {"scale": scale, "n_params": meta["n_params"], "source": redact(params.source),
                   "final_loss": history[-1]["loss"] if history else None,
                   "train_seconds": round(result.seconds, 2) if result is not None else 0.0,
                   "skipped_steps": result.skipped_steps if result is not None else 0,
                   "resumed_from_step": result.resumed_from if result is not None else 0,
                   "wall_seconds": round(time.perf_counter() - start, 2)}
        write_json(metrics_path, metrics)
        write_history(history_path, history or [{"step": 0}])
    if ckpt is not None:
        ckpt.clear()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    add_training_args(parser, SCALES)
    args = parser.parse_args(argv)
    p = load_args(args).at(args.scale)  # per-scale values for this scale
    check_paths(inputs={"--latents": args.latents},
                outputs={"--out": args.out, "--metrics": args.metrics, "--history": args.history})
    m = distributed.run_on_ranks(p.base, lambda dist, device: run(
        p.teacher, p.base, args.scale, args.latents, args.out, args.metrics, args.history, device=device, dist=dist,
        checkpoint_root=checkpoint_root(p.base)))
    if m is None:  # not rank 0
        return {}
    print(f"teacher-{args.scale}: {m['n_params'] / 1e6:.2f} M params, source {m['source']}, final loss {m['final_loss']}, "
          f"{m['wall_seconds']:.0f} s -> {args.out}")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
