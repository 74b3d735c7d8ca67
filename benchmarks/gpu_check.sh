#!/bin/bash
# The GPU checks, as one script for a CUDA machine (python3 with torch, safetensors, pyyaml, tqdm, pytest):
#   1. the CUDA tests: fast JVP vs generic forward AD, bf16 autocast only on the grad forward, and the teacher and
#      distill stages under torchrun with NCCL (DDP, 2 micro-batches) against a plain process, then with bf16;
#   2. the core benchmark on a paper-size network (scale S, 258 M parameters) with and without bf16 autocast.
# Logs go to $OUT (or ./gpu_check) when set.
set -o pipefail
out=${OUT:-gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -rs tests/scm/test_cuda.py tests/stages/test_distributed.py -k "cuda" 2>&1 \
    | tee "$out/pytest.log"
status=$?
python3 benchmarks/bench_core.py --scale S --shape 4 32 32 --batch 64 --repeats 10 --bf16 2>&1 | tee "$out/bench_S.log"
exit $status
