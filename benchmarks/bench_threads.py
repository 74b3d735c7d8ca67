"""Benchmark of torch's thread count and OpenMP wait policy on a machine that is idle and on one that is busy.

One teacher training step and one sCD step of the same network and batch, timed at each thread count and for each
OpenMP wait policy (unset: idle threads spin first; PASSIVE: they sleep, the stages' default), first on an idle
machine and then while this script keeps one competing CPU-bound process running (a numpy loop of its own, as
another user's job or a second stage would be). Prints the step times and the slowdown that the competing process
causes: the numbers the defaults (``base.threads``, ``OMP_WAIT_POLICY`` in ``stages/__init__.py``) are chosen by.

    python benchmarks/bench_threads.py --scale cpu-s --shape 4 7 7 --batch 256

Run it on an otherwise idle machine: the "idle" rows are only idle if nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

STEP_SCRIPT = r"""
import copy, json, statistics, sys, time
import torch
from scm import losses
from scm import networks
from scm import nn as scm_nn
from scm import trigflow

scale, shape, batch, repeats, threads = sys.argv[1], tuple(map(int, sys.argv[2].split(","))), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
net = networks.build(networks.network_config(scale, in_channels=shape[0]))
teacher = copy.deepcopy(net).eval().requires_grad_(False)
head = scm_nn.AdaptiveWeight()
params = list(net.parameters()) + list(head.parameters())
opt = torch.optim.RAdam(params, lr=1e-4)
x0 = 0.5 * torch.randn(batch, *shape)
cfg = losses.SCMConfig(sigma_data=0.5, tangent_warmup_steps=0)
steps = {
    "teacher": lambda: losses.optimizer_step(losses.diffusion_loss(net, x0, sigma_data=0.5, P_mean=-0.8, P_std=1.6, weight_head=head).loss, params, opt),
    "scd": lambda: losses.optimizer_step(losses.scm_loss(net, x0, cfg=cfg, step=10**6, weight_head=head,
                                                         teacher=lambda x, t: trigflow.velocity(teacher, x, t, 0.5)).loss, params, opt),
}
out = {}
for name, fn in steps.items():
    fn(); fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
print(json.dumps(out))
"""


def busy(stop: mp.Event) -> None:
    """One CPU-bound single-threaded process: numpy matrix products until told to stop."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import numpy as np

    a = np.random.default_rng(0).standard_normal((256, 256))
    while not stop.is_set():
        a = np.tanh(a @ a.T / 256)


def step_times(args: argparse.Namespace, threads: int, policy: str) -> dict[str, float]:
    """Median step times of a fresh process with ``threads`` torch threads and OpenMP wait ``policy``."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.getcwd()} | ({"OMP_WAIT_POLICY": policy} if policy != "unset" else {})
    res = subprocess.run([sys.executable, "-c", STEP_SCRIPT, args.scale, ",".join(map(str, args.shape)), str(args.batch),
                          str(args.repeats), str(threads)], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="cpu-s")
    ap.add_argument("--shape", type=int, nargs=3, default=[4, 7, 7], metavar=("C", "H", "W"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--policies", nargs="+", default=["unset", "PASSIVE"], help="OMP_WAIT_POLICY values to compare")
    args = ap.parse_args()

    configs = [(threads, policy) for threads in args.threads for policy in args.policies]
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    for threads, policy in configs:
        results["idle", threads, policy] = step_times(args, threads, policy)
    stop = mp.Event()
    competitor = mp.Process(target=busy, args=(stop,), daemon=True)
    competitor.start()
    try:
        time.sleep(1.0)  # let it reach full speed
        for threads, policy in configs:
            results["busy", threads, policy] = step_times(args, threads, policy)
    finally:
        stop.set()
        competitor.join(10)

    print(f"{os.cpu_count()} CPUs; scale {args.scale}, batch {args.batch} x {tuple(args.shape)}; median of {args.repeats}")
    best = {step: min(results["idle", t, p][step] for t, p in configs) for step in ("teacher", "scd")}
    for step in ("teacher", "scd"):
        for threads, policy in configs:
            idle, loaded = results["idle", threads, policy][step], results["busy", threads, policy][step]
            print(f"{step:8s} {threads} thread(s), OMP_WAIT_POLICY {policy:7s}: idle {idle * 1e3:7.1f} ms "
                  f"({idle / best[step]:4.2f}x the fastest idle), beside one busy process {loaded * 1e3:7.1f} ms: "
                  f"{loaded / idle:5.2f}x slower")


if __name__ == "__main__":
    main()
