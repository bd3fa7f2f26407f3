#!/usr/bin/env bash
# Issue #9 (cost of the relative position bias in the Triton HSTU kernels) on the 2-GPU device
# machine, in one call (under 240 s):
#   run(kind="nvidia-h200-x2", timeout_s=240, command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_k9.sh")
# GPU 0: 1. per-kernel breakdown (benchmarks/tools/hstu_bias_breakdown.py), N=4096 bf16 and the
#           ML-1M fp32 shape, strips on: no bias, bias without / with its gradient (carried wraps,
#           the default; full column sums, the old way), with and without register-capped tiles,
#           and with the dK/dV kernel pinned to other tiles (DKDV_CONFIGS).
# GPU 1: 2. the official attention benchmark at N=4096 (rab_cost_ratio), at the same time as 1:
#           each process has a GPU of its own, so neither disturbs the other's timings; then
#        3. the kernels' GPU tests that touch the bias tables and the diagonal sums (default tile
#           configs, untuned: tuning every candidate would not compile within the time limit).
# Knobs (environment): VARIANTS, DKDV_CONFIGS, SHAPES of the breakdown; ATTENTION=0 leaves out the
# official benchmark; TESTS, the pytest -k expression; T_* the stages' time limits.
# Writes under $OUT: versions.txt (with each stage's exit code and seconds), breakdown.json/.log,
# hstu_attention.json/.log, pytest.log.
set -u
DEFAULT_OUT=/tmp/k9_out
source "$(dirname "$0")/device_env.sh"
T_BREAKDOWN="${T_BREAKDOWN:-180}" T_ATTENTION="${T_ATTENTION:-130}" T_TEST="${T_TEST:-55}"
VARIANTS="${VARIANTS:-none_nocap,pos_nograd,pos_nograd_nocap,pos_diag,pos_diag_nocap,pos_diag_columns}"
DKDV_CONFIGS="${DKDV_CONFIGS-32:32:4:4}"  # pos_diag with the dK/dV kernel pinned to these tiles too
SHAPES="${SHAPES:-n4096_bf16,ml1m_fp32}"
ATTENTION="${ATTENTION:-1}"  # 0: no official benchmark (GPU 1 runs only the tests)
TESTS="${TESTS:-every_way or gpu_tables or strips or (every_kernel_variant and dkdv and tables and not targets)}"
stage() {  # name, GPU, timeout, command...
    local name="$1" gpu="$2" limit="$3"; shift 3
    local t0=$SECONDS
    CUDA_VISIBLE_DEVICES="$gpu" timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $((SECONDS - t0)) s (started at +${t0} s)" >> "$OUT/versions.txt"
}
gpu1() {
    if [ "$ATTENTION" = 1 ]; then
        stage hstu_attention 1 "$T_ATTENTION" "$PY" benchmarks/hstu_attention.py --configs 4096 --tune-top 2 \
            --json "$OUT/hstu_attention.json"
    fi
    GAUSS_HSTU_AUTOTUNE=0 stage pytest 1 "$T_TEST" "$PY" -m pytest -q -x -p no:cacheprovider \
        tests/kernels/test_hstu_triton.py -k "$TESTS"
}
gpu1 &
second=$!
stage breakdown 0 "$T_BREAKDOWN" "$PY" benchmarks/tools/hstu_bias_breakdown.py --shapes "$SHAPES" \
    --strips on --tune-top 2 --variants "$VARIANTS" --dkdv-configs "$DKDV_CONFIGS" --json "$OUT/breakdown.json"
wait "$second"
cat "$OUT/versions.txt"
echo "== breakdown"; grep -v "^{'shape'" "$OUT/breakdown.log" | tail -5
"$PY" - "$OUT/breakdown.json" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except Exception as exc:
    sys.exit(f"no breakdown JSON: {exc}")
for r in rows:
    print(f"{r['shape']:11s} {r['variant']:18s} fwdbwd {r['fwdbwd_ms']:.4f} ratio {r['ratio_vs_none']:.3f} "
          f"fwd {r['fwd_ms'] or 0:.4f} dkdv {r['dkdv_ms'] or 0:.4f} dq {r['dq_ms'] or 0:.4f} {r['tuned']}")
EOF
[ "$ATTENTION" = 1 ] && echo "== attention" && grep -i "rab_cost_ratio\|error\|Traceback" "$OUT/hstu_attention.log" | tail -5 && "$PY" -c "import json,sys; s=json.load(open(sys.argv[1]))['summary']; print({k: s.get(k) for k in ('rab_cost_ratio','fwd_tflops_n4096','fwdbwd_tflops_n4096','fwd_tflops_n4096_rab','fwdbwd_tflops_n4096_rab','rab_diag_off_cost_ratio','max_rel_err_rab')})" "$OUT/hstu_attention.json"
echo "== pytest"; tail -5 "$OUT/pytest.log"
