#!/usr/bin/env bash
# Build .raybundle/ray-cp${PYTAG}.tar.xz: Ray core for a machine that has no Ray and no registry
# (the GPU machine: Python 3.12, nothing outside it reachable, 64 MiB of carried files in all).
#
# The ray 2.60.0 cp312 wheel is 79 MB, over the carry limit, so this keeps what `import ray;
# ray.init()` and actors need and drops the rest:
#   - ray/jars (the Java worker), ray/dashboard/client (the dashboard's built web UI): never
#     loaded by a Python job started with include_dashboard=False;
#   - the libraries on top of core (rllib, tune, serve, data, train, llm, air, workflow):
#     `import ray` does not import them, and the elastic launcher uses none of them;
#   - debug symbols of the native parts (strip -g keeps every dynamic symbol).
# plus the pure-python dependencies the GPU image lacks (ray's Requires-Dist minus what the image
# has: click filelock msgpack packaging protobuf pyyaml requests are there; jsonschema and its
# chain are not). Versions are pinned to the ones this project's CPU venv runs Ray with.
#
# Usage:  scripts/device_ray_bundle.sh [PYTAG]     (PYTAG 312 by default; 311 builds the CPU proxy)
# On the target machine (from the repository root):
#   mkdir -p /tmp/site && tar -xJf .raybundle/ray-cp312.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
# Ray's raylet starts its workers with the driver's environment, so they see /tmp/site too.
set -euo pipefail

PYTAG="${1:-312}"
case "$PYTAG" in 3[0-9][0-9]) ;; *) echo "PYTAG must look like 312 (CPython 3.12), got '$PYTAG'" >&2; exit 2 ;; esac
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUTDIR="$ROOT/.raybundle"
OUT="$OUTDIR/ray-cp${PYTAG}.tar.xz"
LIMIT_MB=55
PACKAGES=(ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
          rpds-py==2026.9.1 attrs==26.1.0)

# The bundle is a build output: keep it out of git without touching the shared .gitignore.
EXCLUDE="$ROOT/.git/info/exclude"
if [ -d "$ROOT/.git" ] && ! grep -qx '/.raybundle/' "$EXCLUDE" 2>/dev/null; then
    echo '/.raybundle/' >> "$EXCLUDE"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/raybundle.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/wheels" "$WORK/site" "$OUTDIR"

python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTAG:0:1}.${PYTAG:1}" \
    --implementation cp --abi "cp${PYTAG}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$WORK/wheels" "${PACKAGES[@]}"
for whl in "$WORK"/wheels/*.whl; do
    python3 -m zipfile -e "$whl" "$WORK/site"
done

SITE="$WORK/site"
rm -rf "$SITE"/ray/jars "$SITE"/ray/dashboard/client \
       "$SITE"/ray/rllib "$SITE"/ray/tune "$SITE"/ray/serve "$SITE"/ray/data "$SITE"/ray/train \
       "$SITE"/ray/llm "$SITE"/ray/air "$SITE"/ray/workflow
find "$SITE" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$SITE" -name '*.map' -type f -delete
# zipfile does not keep the executable bit: the raylet and GCS server are started as programs.
chmod +x "$SITE"/ray/core/src/ray/gcs/gcs_server "$SITE"/ray/core/src/ray/raylet/raylet
find "$SITE" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/core/src/ray/*' \) -print0 |
    while IFS= read -r -d '' f; do
        if file -b "$f" | grep -q '^ELF'; then strip -g "$f"; fi
    done

tar -C "$SITE" -cf - . | xz -T0 -9 > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"  # atomic: a half-written bundle never carries the final name
SIZE=$(stat -c %s "$OUT")
echo "wrote $OUT: $((SIZE / 1048576)) MiB ($(du -sh "$SITE" | cut -f1) unpacked) from ${PACKAGES[*]}"
if [ "$SIZE" -gt $((LIMIT_MB * 1048576)) ]; then
    echo "the bundle is over ${LIMIT_MB} MiB: it will not fit the 64 MiB carry beside the repository" >&2
    exit 1
fi
