#!/usr/bin/env bash
# The three GPU presets' rehearsals (tests/test_rehearsals.py) on a CUDA device with the presets' own bf16:
# cifar10-gpu, imagenet64-gpu and imagenet512-gpu, each through a real `dvc repro`, shrunk in size only.
# Prints each rehearsal's time; the target is under 5 minutes for all three. Usage: benchmarks/rehearse_gpu.sh [cuda:N]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'rehearse_gpu.sh: no CUDA device')"
start=$(date +%s)
SCM_REHEARSAL_DEVICE="${1:-cuda}" python -m pytest -m rehearsal -p no:cacheprovider -q --durations=3 tests/test_rehearsals.py
echo "rehearse_gpu.sh: all three presets in $(( $(date +%s) - start )) s on ${1:-cuda}"
