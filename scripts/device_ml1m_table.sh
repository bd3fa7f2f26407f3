#!/usr/bin/env bash
# The paper's ML-1M table with the refit protocol on the 2-GPU device machine, in one call (~8 min):
#   run(kind="nvidia-h200-x2", timeout_s=600, carry=[".devdata"],
#       command="python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; bash scripts/device_ml1m_table.sh")
# .devdata/ml-1m holds a copy of ../shared/data/ml-1m (git-ignored; the device machine cannot see ../shared).
# Six processes (3 models x seeds 42, 43), three per GPU; each selects its epoch on validation, then
# refits on train + validation items for that many epochs (--refit). Run folders and logs go under
# $OUT, so a run cut by the time limit still returns what finished.
set -u
DEFAULT_OUT=/tmp/ml1m_out
source "$(dirname "$0")/device_env.sh"
SEEDS="${SEEDS:-42 43}"
timeout "${LIMIT_S:-560}" "$PY" benchmarks/ml1m_paper_table.py --parallel --refit --gpus 0,1 --seeds $SEEDS \
    --data-path .devdata/ml-1m --workdir "$OUT/runs" --out "$OUT/ml1m_paper_table.json" > "$OUT/table.log" 2>&1
echo "table rc=$?" >> "$OUT/versions.txt"
rm -f "$OUT"/runs/*/model.safetensors
cat "$OUT/versions.txt"; tail -8 "$OUT/table.log"; grep -h "refit: test\|selected epoch" "$OUT"/runs/*.log | head -20
