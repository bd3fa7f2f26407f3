#!/usr/bin/env bash
# Session 6's closing GPU checks on the 2-GPU device machine, in one call (~3.5 min):
#   run(kind="nvidia-h200-x2", timeout_s=240, carry=[".devdata"],
#       command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_final_s6.sh")
# GPU 0: the ML-1M training-step benchmark (dynamic vs static item table, #9), then the GPU tests of the
# embedding tables and HSTU modules; GPU 1 at the same time, alone: the official attention benchmark (#9
# rab_cost_ratio), then as many of the Triton attention GPU tests as the time allows.
set -u
DEFAULT_OUT=/tmp/final_out
source "$(dirname "$0")/device_env.sh"
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 90 "$PY" benchmarks/hstu_train_step.py --data-path .devdata/ml-1m --json "$OUT/hstu_train_step.json" \
      > "$OUT/train_step.log" 2>&1
  echo "train_step rc=$?" >> "$OUT/rc0.txt"
  timeout 100 "$PY" -m pytest -q -m gpu tests/embedding tests/hstu tests/kernels/test_triton_hash_index.py \
      -p no:cacheprovider > "$OUT/pytest_gpu0.log" 2>&1
  echo "pytest gpu0 rc=$?" >> "$OUT/rc0.txt"
) &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 190 "$PY" benchmarks/hstu_attention.py --configs 4096 --tune-top 2 --json "$OUT/hstu_attention_h200_strips.json" \
      > "$OUT/hstu_attention.log" 2>&1
  echo "hstu_attention rc=$?" >> "$OUT/rc1.txt"
  GAUSS_HSTU_AUTOTUNE=0 timeout "${T_TRITON_TESTS:-70}" "$PY" -m pytest -q -m gpu tests/kernels/test_hstu_triton.py \
      -p no:cacheprovider > "$OUT/pytest_gpu1.log" 2>&1
  echo "pytest gpu1 (triton attention, cut by its limit: rc 124) rc=$?" >> "$OUT/rc1.txt"
) &
wait
cat "$OUT/versions.txt" "$OUT"/rc*.txt; tail -25 "$OUT/train_step.log"; tail -4 "$OUT/pytest_gpu0.log" "$OUT/pytest_gpu1.log"; tail -30 "$OUT/hstu_attention.log"
