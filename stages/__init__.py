"""The DVC stages of the study, one module each: ``ls stages/`` is the stage list of ``dvc.yaml``.

Importing the package makes OpenMP's idle threads sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``, unless the
environment chooses otherwise). It has to happen here, before any stage imports torch, whose OpenMP runtime reads the
variable once, when it loads. Spinning threads are what make a 2-thread stage 4x slower beside one other busy
process; sleeping ones keep it within 2x, compute the same numbers, and cost little on an idle machine
(``benchmarks/bench_threads.py``; README, "Threads").
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
