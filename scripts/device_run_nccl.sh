#!/usr/bin/env bash
# The elastic launcher over NCCL on a 2-GPU machine that has no Ray (issue #12), in one device call:
#   run(kind="nvidia-h200-x2", carry=[".raybundle"], command="bash scripts/device_run_nccl.sh")
# Needs .raybundle/ray-cp312.tar.xz, built here first by scripts/device_ray_bundle.sh (18 MiB).
# Writes under $OUT: versions.txt, pip.log, nccl_abort_probe.json/.log, pytest.log, junit.xml,
# ray_logs.tgz (the workers' logs, for a failure). About 3 minutes expected; the stages' timeouts
# (120 + 90 + 330 s) keep the whole call under the device's 600 s limit.
set -u
OUT="${OUT:-/tmp/nccl_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PY:-$(command -v python || command -v python3)}"
BUNDLE="${BUNDLE:-.raybundle/ray-cp312.tar.xz}"  # PY and BUNDLE: overridable for a dry run elsewhere

{ date -u; nvidia-smi -L; uptime; } > "$OUT/versions.txt" 2>&1
if [ ! -f "$BUNDLE" ]; then
    echo "missing $BUNDLE: build it with scripts/device_ray_bundle.sh and carry .raybundle" | tee -a "$OUT/versions.txt"
    exit 2
fi
mkdir -p /tmp/site && tar -xJf "$BUNDLE" -C /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # Ray's workers inherit it from this environment
export RAY_AUTH_MODE=disabled
export NCCL_DEBUG=WARN  # NCCL's own complaints land in the workers' logs (ray_logs.tgz)
"$PY" -c "import sys, ray, torch; print(sys.version.split()[0], 'ray', ray.__version__, 'torch', torch.__version__,
    'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None, 'gpus', torch.cuda.device_count())" \
    >> "$OUT/versions.txt" 2>&1
timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1
echo "pip install rc=$?" >> "$OUT/versions.txt"

# The mechanism alone (no Ray): a hung all-reduce on a dead peer, aborted from another thread.
timeout 90 "$PY" scripts/nccl_abort_probe.py --json "$OUT/nccl_abort_probe.json" > "$OUT/nccl_abort_probe.log" 2>&1
echo "nccl_abort_probe rc=$?" >> "$OUT/versions.txt"

# The launcher: SIGKILL inside an all-reduce, abort, regroup, a replacement joins; rows on the GPU.
timeout 330 "$PY" -m pytest -s -rA -p no:cacheprovider tests/elastic/test_elastic_nccl.py \
    --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1
RC=$?
echo "pytest rc=$RC" >> "$OUT/versions.txt"
if [ -d /tmp/gnccl/session_latest/logs ]; then
    tar -czf "$OUT/ray_logs.tgz" -C /tmp/gnccl/session_latest logs 2>/dev/null
    if [ "$(stat -c %s "$OUT/ray_logs.tgz")" -gt 20000000 ]; then  # keep what comes back small
        tar -czf "$OUT/ray_logs.tgz" -C /tmp/gnccl/session_latest --wildcards 'logs/worker-*' 2>/dev/null
    fi
fi
tail -5 "$OUT/pytest.log"
cat "$OUT/versions.txt"
exit $RC
