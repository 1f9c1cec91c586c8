#!/usr/bin/env bash
# The GPU check of issue 14 in one command, for a lent H100/H200 (about 4-6 minutes):
#   bash bench/gpu_check.sh
# 1. the CUDA tests: tests/model_core/test_sync_free.py (the loops' answers on CPU and CUDA)
#    and every test marked `cuda` under tests/model_core;
# 2. bench/gpu_check.py: single-image fmnist-conv infer latency, samples/s at batch 1,024,
#    a cifar-conv training epoch at batch 128 against the paper's 1.4 h / 40 epochs.
# Writes bench/results/gpu_check-<device>.json, and copies it and the logs to $OUT if set.
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG=${OUT:-bench/results}
mkdir -p "$LOG"
nvidia-smi -L
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
timeout 300 $PY -m pytest -q -p no:cacheprovider -x --durations=10 \
  tests/model_core/test_sync_free.py tests/model_core/test_operators.py tests/model_core/test_config.py \
  -k "sync_free or cuda" 2>&1 | tee "$LOG/gpu_check-tests.log"
tests=$?
timeout 240 $PY bench/gpu_check.py "$@" 2>&1 | tee "$LOG/gpu_check-bench.log"
bench=$?
[ -n "$OUT" ] && cp bench/results/gpu_check-*.json "$OUT"/ 2>/dev/null
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
