#!/usr/bin/env bash
# Issue #11 on one GPU of the device machine, in one call (under 240 s):
#   run(kind="nvidia-h200-x2", timeout_s=240, command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_c11.sh")
# 1. where the cached step synchronises with the GPU (benchmarks/tools/cache_sync_sites.py);
# 2. the cache's GPU tests (NCCL ones left out: one GPU is enough here);
# 3. the lookahead benchmark's Zipf part, full size, 2 reps (step ratio vs in-memory, speedup vs LRU);
# 4. with a folder .c11_before/ (src/ and benchmarks/ of an earlier commit, e.g. from
#    `git archive <commit> src benchmarks`), stage 1 again on that code (sync_sites_before.*):
#    its gauss_plugins comes first on the path; the kernels are this tree's.
# Writes under $OUT: versions.txt, sync_sites*.json/.log, pytest.log, cache.json/.png/.log.
set -u
DEFAULT_OUT=/tmp/c11_out
source "$(dirname "$0")/device_env.sh"
T_SYNC="${T_SYNC:-45}" T_BENCH="${T_BENCH:-80}" T_TEST="${T_TEST:-45}" T_BEFORE="${T_BEFORE:-40}"
stage() {  # name, timeout, command...
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $((SECONDS - t0)) s" >> "$OUT/versions.txt"
}
stage sync_sites "$T_SYNC" "$PY" benchmarks/tools/cache_sync_sites.py --quick --json "$OUT/sync_sites.json"
stage pytest "$T_TEST" "$PY" -m pytest -q -m gpu tests/cache/test_lookahead_gpu.py -k "not nccl" -p no:cacheprovider
stage cache "$T_BENCH" "$PY" benchmarks/lookahead_cache.py --device cuda --only zipf --reps 2 --json "$OUT/cache.json"
if [ -d .c11_before ]; then
    (cd .c11_before && PYTHONPATH="$PWD/src" stage sync_sites_before "$T_BEFORE" "$PY" benchmarks/tools/cache_sync_sites.py \
        --quick --steps 12 --json "$OUT/sync_sites_before.json")
fi
cat "$OUT/versions.txt"
for f in sync_sites sync_sites_before; do [ -f "$OUT/$f.log" ] && { echo "== $f"; tail -32 "$OUT/$f.log"; }; done
tail -2 "$OUT/cache.log"; tail -4 "$OUT/pytest.log"
