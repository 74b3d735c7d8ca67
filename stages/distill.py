"""Distill stage (per scale): sCD from the teacher or sCT (``distill.method``), both initialised from the teacher's EMA.

Consumes ``data/latents`` and ``artifacts/<scale>/teacher``. Produces ``artifacts/<scale>/distill/model.safetensors``
(the student's EMA weights) with ``resolved_params.json``, ``metrics/<scale>/distill.json`` and the training curve
``plots/<scale>/distill_history.csv`` (loss, ‖g‖, r, w_φ, gradient norm, images/s).

The objective is paper Eq. 8 / Alg. 1 (:func:`scm.losses.scm_loss`): F⁻ from the online weights under stop-grad,
dx_t/dt from the frozen teacher EMA (sCD) or cos t·z − sin t·x0 (sCT), tangent warm-up, normalisation, adaptive
weighting, RAdam (App. G.2). With ``base.conditional`` the student learns on the data's labels; guided sCD
(``distill.guidance_max`` > 1) distils the teacher's classifier-free-guided ODE at s ~ U[1, s_max] and gives the
student s as an input, so one student samples at any guidance in that range (App. G, ImageNet 512).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from scm import networks
from scm.losses import SCMConfig, guidance_scale, scm_loss
from scm.scales import SCALES
from scm.trigflow import guided_teacher_velocity, velocity
from study import distributed
from study.checkpoint import checkpoint_root, run_checkpointer
from study.cli import add_params_args, add_training_args, cli, load_args
from study.errors import StageError
from study.files import atomic_output_dir, check_paths, write_json, write_provenance
from study.latents import load_latents
from study.models import MODEL_FILE, load_model, save_model
from study.params import BaseParams, DistillParams, to_plain
from study.runtime import amp_dtype
from study.training import TrainSpec, make_optimizer, train, write_history


def scm_config(params: DistillParams, sigma_data: float) -> SCMConfig:
    """The sCM objective's hyperparameters, every one of them from ``params.yaml``."""
    return SCMConfig(sigma_data=sigma_data, P_mean=params.P_mean, P_std=params.P_std, c=params.tangent_c,
                     tangent_norm=params.tangent_norm, tangent=params.tangent,
                     tangent_warmup_steps=params.tangent_warmup_steps, prior_weight=params.prior_weight,
                     share_dropout=True)


def student_from_teacher(teacher: torch.nn.Module, dropout: float, seed: int,
                         levels: tuple[int, ...] = (), *, guidance: bool = False) -> torch.nn.Module:
    """The student: a trainable copy of the teacher's EMA (App. G.2: "We always initialize the CM from the EMA
    parameters of the teacher") with the distill stage's dropout (at ``levels`` only, if given) and, for guided sCD,
    an embedding of the guidance scale s that starts at zero (so the student starts as the teacher at every s)."""
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher)
    if guidance:
        try:
            student = networks.with_guidance_embedding(student)
        except ValueError as e:
            raise StageError(f"distill.guidance_max: {e}") from None
    student.requires_grad_(True).train()
    try:
        networks.set_dropout(student, dropout, levels)
    except ValueError as e:
        raise StageError(f"distill.dropout_levels: {e}") from None
    return student


def distill_spec(params: DistillParams, sigma_data: float, scale: str, seed: int, teacher: torch.nn.Module,
                 student: torch.nn.Module) -> TrainSpec:
    """The sCM objective (paper Eq. 8 / Alg. 1) and the optimiser of ``distill.optimizer``: the grad-enabled forward
    through the loop's (DDP) module, the JVP on the plain ``student``; dx_t/dt from the frozen ``teacher`` (sCD) or
    from the data (sCT).

    A class-conditional batch (the loop passes its labels) conditions teacher and student on them; guided sCD
    (``guidance_max`` > 1) draws s ~ U[1, s_max] per sample, guides the teacher's velocity with it (CFG) and feeds
    it to the student (paper App. G, ImageNet 512)."""
    cfg = scm_config(params, sigma_data)

    def objective(net_dp: torch.nn.Module, head_dp: torch.nn.Module | None):
        def loss(step: int, x0: torch.Tensor, noise, labels: torch.Tensor | None = None):
            s = guidance_scale(noise.c, params.guidance_max) if labels is not None and params.guidance_max > 1 else None
            if params.method == "sct":
                teacher_v = None
            elif labels is None:
                teacher_v = lambda x_t, t: velocity(teacher, x_t, t, sigma_data)
            else:
                teacher_v = lambda x_t, t: guided_teacher_velocity(teacher, x_t, t, sigma_data, labels,
                                                                   1.0 if s is None else s)
            return scm_loss(net_dp, x0, cfg=cfg, step=step, teacher=teacher_v, weight_head=head_dp, noise=noise,
                            tangent_net=student, class_labels=labels, guidance=s)
        return loss

    return TrainSpec(name=f"distill-{scale}", section="distill", settings=params, seed=seed + 1000,
                     objective=objective, optimizer=make_optimizer(params))


def run(params: DistillParams, base: BaseParams, scale: str, latents_dir: Path, teacher_dir: Path,
        out_dir: Path, metrics_path: Path, history_path: Path, *, device: str = "cpu", progress: bool = True,
        dist: distributed.Dist = distributed.SINGLE, checkpoint_root: Path | None = None) -> dict[str, Any] | None:
    """Distill the teacher of ``scale`` into a 1-/2-step consistency model (outputs from rank 0; others get None).

    With ``checkpoint_root``, training checkpoints go to ``checkpoint_root/distill-<scale>`` and a re-run resumes.
    """
    start = time.perf_counter()
    params = params.at(scale)  # per-scale values (distill.dropout: {S: 0.0, M: 0.1}) for this scale
    data = load_latents(latents_dir)
    teacher, meta = load_model(teacher_dir, expect_shape=data.shape, expect_scale=scale, device=device)
    num_classes = networks.num_classes(teacher)
    if base.conditional != bool(num_classes):
        raise StageError(f"{teacher_dir}: a teacher of {num_classes} classes, but base.conditional is "
                         f"{str(base.conditional).lower()} (re-run the teacher stage)")

    student = student_from_teacher(teacher, params.dropout, base.seed, params.dropout_levels,
                                   guidance=params.guidance_max > 1)
    student.amp_dtype = amp_dtype(base.precision, device)
    spec = distill_spec(params, base.sigma_data, scale, base.seed, teacher, student)
    ckpt = run_checkpointer(checkpoint_root, spec.name, params.checkpoint_every, stage="distill", params=params,
                            base=base, inputs=[Path(latents_dir) / "latents.safetensors", Path(teacher_dir) / MODEL_FILE])
    x0, labels, posterior_std = data.training_set(base.train_split)
    result = train(student, spec, x0, labels=labels if num_classes else None, posterior_std=posterior_std,
                   dist=dist, checkpoint=ckpt, progress=progress)
    if not dist.is_main:
        return None

    with atomic_output_dir(out_dir) as tmp:
        save_model(tmp / MODEL_FILE, result.ema.net, {**meta, "role": f"student-{params.method}",
                                                      "guidance_max": params.guidance_max})
        write_provenance(tmp, {"base": to_plain(base), "distill": to_plain(params), "scale": scale,
                               "teacher": str(teacher_dir), "latents": str(latents_dir), "device": device,
                               "world_size": dist.world_size}, seconds={"train": result.seconds})
        # The metrics and the curve last, still inside: if either cannot be written, the old model stays too.
        last = result.history[-1]
        metrics = {"scale": scale, "method": params.method, "n_params": meta["n_params"], "final_loss": last["loss"],
                   "final_g_norm": last.get("g_norm"), "final_r": last.get("r"),
                   "nonfinite_samples": sum(r.get("nonfinite", 0) for r in result.history),
                   "skipped_steps": result.skipped_steps, "resumed_from_step": result.resumed_from,
                   "train_seconds": round(result.seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2)}
        write_json(metrics_path, metrics)
        write_history(history_path, result.history)
    ckpt.clear()
    return metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m stages.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_params_args(parser)
    add_training_args(parser, SCALES)
    parser.add_argument("--teacher", type=Path, required=True, help="teacher stage output directory")
    args = parser.parse_args(argv)
    p = load_args(args).at(args.scale)  # per-scale values for this scale
    check_paths(inputs={"--latents": args.latents, "--teacher": args.teacher},
                outputs={"--out": args.out, "--metrics": args.metrics, "--history": args.history})
    m = distributed.run_on_ranks(p.base, lambda dist, device: run(
        p.distill, p.base, args.scale, args.latents, args.teacher, args.out, args.metrics, args.history, device=device,
        dist=dist, checkpoint_root=checkpoint_root(p.base)))
    if m is None:  # not rank 0
        return {}
    print(f"distill-{args.scale}: {m['method']}, final loss {m['final_loss']:.4f}, {m['skipped_steps']} skipped steps, "
          f"{m['wall_seconds']:.0f} s -> {args.out}")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
