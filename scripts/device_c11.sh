#!/usr/bin/env bash
# Issue #11 on one GPU of the device machine, in one call (about 3 minutes):
#   run(kind="nvidia-h200-x2", timeout_s=240, command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_c11.sh")
# 1. where the cached step synchronises with the GPU (benchmarks/tools/cache_sync_sites.py);
# 2. the lookahead benchmark's Zipf part, --quick (step ratio vs in-memory, speedup vs LRU);
# 3. the cache's GPU tests (NCCL ones left out: one GPU is enough here).
# Writes under $OUT: versions.txt, sync_sites.json/.log, cache.json/.png/.log, pytest.log.
# The stages' timeouts (70 + 100 + 50 s) keep the call under 240 s.
set -u
OUT="${OUT:-/tmp/c11_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PY:-$(command -v python || command -v python3)}"
{ date -u; nvidia-smi -L; uptime; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/versions.txt" 2>&1
timeout 70 "$PY" benchmarks/tools/cache_sync_sites.py --quick --json "$OUT/sync_sites.json" > "$OUT/sync_sites.log" 2>&1
echo "sync_sites rc=$?" >> "$OUT/versions.txt"
timeout 100 "$PY" benchmarks/lookahead_cache.py --device cuda --quick --only zipf --json "$OUT/cache.json" \
    > "$OUT/cache.log" 2>&1
echo "cache bench rc=$?" >> "$OUT/versions.txt"
timeout 50 "$PY" -m pytest -q -m gpu tests/cache/test_lookahead_gpu.py -k "not nccl" -p no:cacheprovider \
    > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >> "$OUT/versions.txt"
cat "$OUT/versions.txt"; tail -40 "$OUT/sync_sites.log"; tail -5 "$OUT/cache.log"; tail -5 "$OUT/pytest.log"
