"""Distill stage (per scale): sCD from the teacher or sCT (``distill.method``), both initialised from the teacher's EMA.

Consumes ``data/latents`` and ``artifacts/<scale>/teacher``. Produces ``artifacts/<scale>/distill/model.safetensors``
(the student's EMA weights) with ``resolved_params.json``, ``metrics/<scale>/distill.json`` and the training curve
``plots/<scale>/distill_history.csv`` (loss, ‖g‖, w_φ, gradient norm, images/s).

The objective is paper Eq. 8 / Alg. 1 (:func:`scm.losses.scm_loss`): F⁻ from the online weights under stop-grad,
dx_t/dt from the frozen teacher EMA (sCD) or cos t·z − sin t·x0 (sCT), tangent warm-up, normalisation, adaptive
weighting, RAdam without a schedule (App. G.2).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch

from scm import nn as snn
from scm.losses import SCMConfig, scm_loss
from scm.trigflow import velocity
from stages import config, distributed
from stages.checkpoint import checkpoint_root, run_checkpointer
from stages.common import atomic_output_dir, cli, write_json, write_provenance
from stages.training import (add_training_args, amp_dtype, load_latents, load_model, run_on_ranks, save_model,
                             train, write_history)


def scm_config(params: config.DistillParams, sigma_data: float) -> SCMConfig:
    return SCMConfig(sigma_data=sigma_data, P_mean=params.P_mean, P_std=params.P_std, c=params.tangent_c,
                     tangent_norm=params.tangent_norm, tangent=params.tangent, warmup_steps=params.warmup_steps,
                     prior_weight=params.prior_weight)


def run(params: config.DistillParams, base: config.BaseParams, scale: str, latents_dir: Path, teacher_dir: Path,
        out_dir: Path, metrics_path: Path, history_path: Path, *, device: str = "cpu", progress: bool = True,
        dist: distributed.Dist = distributed.SINGLE, checkpoint_root: Path | None = None) -> dict[str, Any] | None:
    """Distill the teacher of ``scale`` into a 1-/2-step consistency model (outputs from rank 0; others get None).

    With ``checkpoint_root``, training checkpoints go to ``checkpoint_root/distill-<scale>`` and a re-run resumes.
    """
    start = time.perf_counter()
    data = load_latents(latents_dir)
    teacher, meta = load_model(teacher_dir, expect_shape=data.shape, expect_scale=scale, device=device)

    # Student ← teacher EMA (App. G.2: "We always initialize the CM from the EMA parameters of the teacher").
    torch.manual_seed(base.seed)
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    for m in student.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = params.dropout
    head = snn.AdaptiveWeight().to(device) if params.adaptive_weight else None
    extra = list(head.parameters()) if head is not None else []
    opt = torch.optim.RAdam(list(student.parameters()) + extra, lr=params.lr, betas=(0.9, 0.99), eps=1e-8)

    # The loss: the grad-enabled forward through DDP (when distributed), the JVP on the plain module.
    student_dp, head_dp = distributed.wrap(student, dist), (distributed.wrap(head, dist) if head is not None else None)
    cfg, amp = scm_config(params, base.sigma_data), amp_dtype(base.precision, device)
    teacher_v = (lambda x_t, t: velocity(teacher, x_t, t, base.sigma_data)) if params.method == "scd" else None
    loss_fn = lambda step, x0, noise: scm_loss(student_dp, x0, cfg=cfg, step=step, teacher=teacher_v, weight_head=head_dp,
                                               noise=noise, amp_dtype=amp, tangent_net=student)
    ckpt = run_checkpointer(checkpoint_root, f"distill-{scale}", params.checkpoint_every, params=params, base=base,
                            inputs=[Path(latents_dir) / "latents.safetensors", Path(teacher_dir) / "model.safetensors"])
    result = train(student, extra, loss_fn, data.train, steps=params.steps, batch_size=params.batch_size,
                   optimizer=opt, warmup_steps=0, lr=params.lr, ema_half_life_kimg=params.ema_half_life_kimg,
                   seed=base.seed + 1000, log_every=params.log_every, desc=f"distill-{scale}", section="distill",
                   max_nonfinite=params.max_nonfinite_steps, progress=progress, dist=dist,
                   batch_per_device=params.batch_per_device,
                   ddp_modules=[m for m in (student_dp, head_dp) if m is not None and m is not student and m is not head],
                   checkpoint=ckpt)
    if not dist.is_main:
        return None

    with atomic_output_dir(out_dir) as tmp:
        save_model(tmp / "model.safetensors", result.ema.net, {**meta, "role": f"student-{params.method}"})
        write_provenance(tmp, {"base": config.to_plain(base), "distill": config.to_plain(params), "scale": scale,
                               "teacher": str(teacher_dir), "latents": str(latents_dir), "device": device,
                               "world_size": dist.world_size})
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
    config.add_params_args(parser)
    add_training_args(parser)
    parser.add_argument("--teacher", type=Path, required=True, help="teacher stage output directory")
    args = parser.parse_args(argv)
    p = config.load_args(args)
    m = run_on_ranks(p.base, lambda dist, device: run(
        p.distill, p.base, args.scale, args.latents, args.teacher, args.out, args.metrics, args.history, device=device,
        dist=dist, checkpoint_root=checkpoint_root(p.base)))
    if m is None:  # not rank 0
        return {}
    print(f"distill-{args.scale}: {m['method']}, final loss {m['final_loss']:.4f}, {m['skipped_steps']} skipped steps, "
          f"{m['wall_seconds']:.0f} s -> {args.out}")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
