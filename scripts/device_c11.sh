#!/usr/bin/env bash
# Issue #11 on one GPU of the device machine, in one call (under 240 s):
#   run(kind="nvidia-h200-x2", timeout_s=240, command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_c11.sh")
# 1. where the cached step synchronises with the GPU (benchmarks/tools/cache_sync_sites.py);
# 2. the lookahead benchmark's Zipf part, --quick (step ratio vs in-memory, speedup vs LRU);
# 3. the cache's GPU tests (NCCL ones left out: one GPU is enough here).
# With a folder .c11_next/ (a draft laid over the tree, same paths), stages 1 and 3 then run on
# the draft (sync_sites_next.*, pytest_next.log): one call profiles today's code and checks the change.
# Writes under $OUT: versions.txt, sync_sites*.json/.log, cache.json/.png/.log, pytest*.log.
set -u
OUT="${OUT:-/tmp/c11_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PY:-$(command -v python || command -v python3)}"
T_SYNC="${T_SYNC:-55}" T_BENCH="${T_BENCH:-75}" T_TEST="${T_TEST:-45}"
{ date -u; nvidia-smi -L; uptime; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/versions.txt" 2>&1
stage() {  # name, timeout, command...
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? ${SECONDS}-${t0}=$((SECONDS - t0)) s" >> "$OUT/versions.txt"
}
stage sync_sites "$T_SYNC" "$PY" benchmarks/tools/cache_sync_sites.py --quick --json "$OUT/sync_sites.json"
stage cache "$T_BENCH" "$PY" benchmarks/lookahead_cache.py --device cuda --quick --only zipf --json "$OUT/cache.json"
if [ -d .c11_next ]; then
    cp -r .c11_next/. .
    stage sync_sites_next "$T_SYNC" "$PY" benchmarks/tools/cache_sync_sites.py --quick --json "$OUT/sync_sites_next.json"
    stage pytest_next "$T_TEST" "$PY" -m pytest -q -m gpu tests/cache/test_lookahead_gpu.py -k "not nccl" -p no:cacheprovider
else
    stage pytest "$T_TEST" "$PY" -m pytest -q -m gpu tests/cache/test_lookahead_gpu.py -k "not nccl" -p no:cacheprovider
fi
cat "$OUT/versions.txt"
for f in sync_sites sync_sites_next; do [ -f "$OUT/$f.log" ] && { echo "== $f"; tail -45 "$OUT/$f.log"; }; done
tail -3 "$OUT/cache.log"; tail -3 "$OUT"/pytest*.log
