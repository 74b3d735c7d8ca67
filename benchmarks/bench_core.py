"""Benchmark of the core library: training-step cost of sCD vs the teacher, and sampling speed of sCM vs the teacher.

Prints ratios measured in one run on one network and batch (timed tests would be noise on shared machines):
- one sCD step (frozen-teacher velocity + JVP tangent + grad pass + optimiser) / one teacher training step
  (target ≤ 2.2×; the paper reports about 2×);
- images/s of the teacher's ODE sampler at its default NFE and of sCM 1-step and 2-step; the wall-clock speedup and
  that speedup as a fraction of the NFE ratio (target ≥ 0.9).

    python benchmarks/bench_core.py --scale cpu-s --shape 4 7 7 --batch 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from scm import losses
from scm import networks
from scm import nn as scm_nn
from scm import samplers
from scm import trigflow


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="cpu-s", choices=list(networks.SCALES))
    ap.add_argument("--shape", type=int, nargs=3, default=[4, 7, 7], metavar=("C", "H", "W"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10, help="timed repetitions per measurement (median is reported)")
    ap.add_argument("--teacher-steps", type=int, default=18, help="teacher DPM-Solver-2 steps (NFE = 2n-1)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action="store_true", help="also time the steps with bf16 autocast (CUDA) and print the ratio")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, sd = torch.device(args.device), 0.5

    net = networks.build(networks.network_config(args.scale, in_channels=args.shape[0])).to(dev)
    teacher = copy.deepcopy(net).eval().requires_grad_(False)
    head = scm_nn.AdaptiveWeight().to(dev)
    params = list(net.parameters()) + list(head.parameters())
    opt = torch.optim.RAdam(params, lr=1e-4)
    x0 = sd * torch.randn(args.batch, *args.shape, device=dev)
    teacher_v = lambda x, t: trigflow.velocity(teacher, x, t, sd)
    cfg = losses.SCMConfig(sigma_data=sd, tangent_warmup_steps=0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def teacher_step(amp=None):
        net.amp_dtype = amp
        out = losses.diffusion_loss(net, x0, sigma_data=sd, P_mean=-0.8, P_std=1.6, weight_head=head)
        losses.optimizer_step(out.loss, params, opt)
        sync()

    def scd_step(amp=None):
        net.amp_dtype = amp
        out = losses.scm_loss(net, x0, cfg=cfg, step=10**6, teacher=teacher_v, weight_head=head)
        losses.optimizer_step(out.loss, params, opt)
        sync()

    steps = {"teacher": teacher_step, "scd": scd_step}
    if args.bf16:
        steps |= {"teacher-bf16": lambda: teacher_step(torch.bfloat16), "scd-bf16": lambda: scd_step(torch.bfloat16)}
    for _ in range(2):  # warm-up
        for fn in steps.values():
            fn()
    # Interleave the measurements so that machine noise hits all alike.
    step_times = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, fn in steps.items():
            step_times[k].append(median_time(fn, 1))
    step_sec = {k: statistics.median(v) for k, v in step_times.items()}
    step_teacher, step_scd = step_sec["teacher"], step_sec["scd"]

    # Sampling: same network, same batch, one process, back to back after a warm-up.
    net.eval()
    v = lambda x, t: trigflow.velocity(net, x, t, sd)
    noise = samplers.noise_from_seeds(range(args.batch), args.shape, 2, sigma_data=sd, device=dev)
    ts_teacher = samplers.karras_times(args.teacher_steps, sd)
    nfe_teacher = samplers.teacher_nfe("dpm2", args.teacher_steps)
    jobs = {
        "teacher": (lambda: (samplers.sample_dpm2(v, noise, ts=ts_teacher), sync()), nfe_teacher),
        "scm-1step": (lambda: (samplers.sample_consistency(v, noise, ts=samplers.consistency_times(1, sd)), sync()), 1),
        "scm-2step": (lambda: (samplers.sample_consistency(v, noise, ts=samplers.consistency_times(2, sd)), sync()), 2),
    }
    for fn, _ in jobs.values():
        fn()
    times = {k: [] for k in jobs}
    for _ in range(max(3, args.repeats // 2)):
        for k, (fn, _) in jobs.items():
            times[k].append(median_time(fn, 1))
    sec = {k: statistics.median(v) for k, v in times.items()}

    n_params = scm_nn.count_params(net)
    print(f"device={dev.type} threads={torch.get_num_threads()} scale={args.scale} ({n_params / 1e6:.2f} M params) "
          f"shape={tuple(args.shape)} batch={args.batch} repeats={args.repeats}")
    print(f"teacher step  {step_teacher * 1e3:8.1f} ms")
    print(f"sCD step      {step_scd * 1e3:8.1f} ms")
    print(f"sCD / teacher step cost: {step_scd / step_teacher:.2f}x  (target <= 2.2x; paper ~2x)")
    if args.bf16:
        print(f"bf16 autocast: teacher step {step_sec['teacher-bf16'] * 1e3:.1f} ms ({step_teacher / step_sec['teacher-bf16']:.2f}x "
              f"faster), sCD step {step_sec['scd-bf16'] * 1e3:.1f} ms ({step_scd / step_sec['scd-bf16']:.2f}x faster)")
    for k, (_, nfe) in jobs.items():
        print(f"{k:10s} NFE {nfe:3d}  {args.batch / sec[k]:10.1f} images/s  {sec[k] / args.batch * 1e3:8.3f} ms/image")
    for k in ("scm-1step", "scm-2step"):
        nfe = jobs[k][1]
        speedup = sec["teacher"] / sec[k]
        print(f"{k} speedup over teacher: {speedup:.1f}x, NFE ratio {nfe_teacher / nfe:.1f}x, "
              f"fraction of NFE ratio {speedup / (nfe_teacher / nfe):.2f} (target >= 0.9)")


if __name__ == "__main__":
    main()
