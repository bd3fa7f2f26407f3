# Sourced by the scripts/device_*.sh calls of the device machine: the output folder ($OUT, what the
# `run` tool brings back), the repository root as the working folder, the Python to use ($PY), and
# $OUT/versions.txt with the date, the GPUs, the load and the torch/triton versions.
#   usage, first lines of a script:  DEFAULT_OUT=/tmp/x_out; source "$(dirname "$0")/device_env.sh"
OUT="${OUT:-${DEFAULT_OUT:-/tmp/device_out}}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-$(command -v python || command -v python3)}"
{ date -u; nvidia-smi -L; uptime; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    > "$OUT/versions.txt" 2>&1
