"""Teacher stage (per scale): a TrigFlow diffusion model on the latents, trained here or fetched.

Consumes ``data/latents`` (encode stage). Produces ``artifacts/<scale>/teacher/model.safetensors`` (the EMA weights,
self-describing) with ``resolved_params.json``, the metrics file ``metrics/<scale>/teacher.json`` and the training
curve ``plots/<scale>/teacher_history.csv``.

Training follows the paper's teacher recipe at CPU size: the TrigFlow diffusion loss (Eq. 4) with the log-normal
proposal and adaptive weighting, Adam with a short warm-up, EMA weights for everything downstream (App. G).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from scm import nn as snn
from scm.losses import diffusion_loss
from stages import config, distributed
from stages.checkpoint import checkpoint_root, run_checkpointer
from stages.common import StageError, atomic_output_dir, cli, write_json, write_provenance
from stages.fetch import fetch
from stages.training import (add_training_args, amp_dtype, build_net, load_latents, load_model, run_on_ranks,
                             save_model, train, write_history)


def run(params: config.TeacherParams, base: config.BaseParams, scale: str, latents_dir: Path, out_dir: Path,
        metrics_path: Path, history_path: Path, *, device: str = "cpu", progress: bool = True,
        dist: distributed.Dist = distributed.SINGLE, checkpoint_root: Path | None = None) -> dict[str, Any] | None:
    """Train (or fetch) the teacher of ``scale``; write its EMA weights and metrics (rank 0; other ranks get None).

    With ``checkpoint_root``, training checkpoints go to ``checkpoint_root/teacher-<scale>`` and a re-run resumes.
    """
    start = time.perf_counter()
    if scale not in snn.SCALES:
        raise StageError(f"scale {scale!r}: unknown (accepted: {', '.join(snn.SCALES)})")
    data = load_latents(latents_dir)
    result, ckpt = None, None
    if params.source == "train":
        torch.manual_seed(base.seed)
        net = build_net(scale, data.shape, params.dropout).to(device)
        head = snn.AdaptiveWeight().to(device) if params.adaptive_weight else None
        extra = list(head.parameters()) if head is not None else []
        opt = torch.optim.Adam(list(net.parameters()) + extra, lr=params.lr, betas=(0.9, 0.999), eps=1e-8)
        net_dp, head_dp = distributed.wrap(net, dist), (distributed.wrap(head, dist) if head is not None else None)
        amp = amp_dtype(base.precision, device)
        loss_fn = lambda step, x0, noise: diffusion_loss(net_dp, x0, sigma_data=base.sigma_data, P_mean=params.P_mean,
                                                         P_std=params.P_std, weight_head=head_dp, noise=noise, amp_dtype=amp)
        ckpt = run_checkpointer(checkpoint_root, f"teacher-{scale}", params.checkpoint_every, params=params, base=base,
                                inputs=[Path(latents_dir) / "latents.safetensors"])
        result = train(net, extra, loss_fn, data.train, steps=params.steps, batch_size=params.batch_size,
                       optimizer=opt, warmup_steps=params.warmup_steps, lr=params.lr,
                       ema_half_life_kimg=params.ema_half_life_kimg, seed=base.seed, log_every=params.log_every,
                       desc=f"teacher-{scale}", section="teacher", max_nonfinite=params.max_nonfinite_steps,
                       progress=progress, dist=dist, batch_per_device=params.batch_per_device,
                       ddp_modules=[m for m in (net_dp, head_dp) if m is not None and m is not net and m is not head],
                       checkpoint=ckpt)
    if not dist.is_main:
        return None
    with atomic_output_dir(out_dir) as tmp:
        if result is not None:
            meta = {"role": "teacher", "scale": scale, "latent_shape": list(data.shape), "sigma_data": base.sigma_data}
            save_model(tmp / "model.safetensors", result.ema.net, meta)
        else:
            fetch(params.source, params.sha256, tmp / "model.safetensors")
            load_model(tmp, expect_shape=data.shape, expect_scale=scale, name=f"teacher.source={params.source!r}")  # refuse a teacher of another scale/shape
        _, meta = load_model(tmp)
        write_provenance(tmp, {"base": config.to_plain(base), "teacher": config.to_plain(params), "scale": scale,
                               "latents": str(latents_dir), "device": device, "world_size": dist.world_size})
    history = result.history if result is not None else []
    metrics = {"scale": scale, "n_params": meta["n_params"], "source": params.source,
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
    config.add_params_args(parser)
    add_training_args(parser)
    args = parser.parse_args(argv)
    p = config.load_args(args)
    m = run_on_ranks(p.base, lambda dist, device: run(
        p.teacher, p.base, args.scale, args.latents, args.out, args.metrics, args.history, device=device, dist=dist,
        checkpoint_root=checkpoint_root(p.base)))
    if m is None:  # not rank 0
        return {}
    print(f"teacher-{args.scale}: {m['n_params'] / 1e6:.2f} M params, source {m['source']}, final loss {m['final_loss']}, "
          f"{m['wall_seconds']:.0f} s -> {args.out}")
    return m


if __name__ == "__main__":
    raise SystemExit(cli(main))
