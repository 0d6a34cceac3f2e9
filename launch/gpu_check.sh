#!/usr/bin/env bash
# The one device check of a GPU machine (<= 8 minutes on one H100/H200): CUDA smoke tests (pytest -m cuda), the
# benchmark's reference recipe vs fast path (step, e2e, inference with NMS at batch 1 and batched, peak memory, the
# largest batch) and the data loader's rate per worker against what the GPU consumes.
# Usage: bash launch/gpu_check.sh [--dry_run] [--stages cuda_tests,bench,data] [--out DIR]
# Output: one JSON (gpu_check.json) and a printed table, plus each stage's log, into $OUT if set, else ./gpu_check/.
# Each stage fails loudly and the next one still runs; the exit status is 1 when any stage failed.
# Packages the GPU machine's image lacks travel as wheels in launch/wheels/ (git-ignored; how to fetch them:
# launch/README.md, "GPU check").
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_check}"
mkdir -p "$out"
shopt -s nullglob
wheels=(launch/wheels/*.whl)
if (( ${#wheels[@]} )); then
    # --target keeps the image's own packages untouched; --no-deps: the wheels directory names every one needed.
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
        "${wheels[@]}"; then
        export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "!! gpu_check: installing launch/wheels/*.whl FAILED; the stages that need them will fail" >&2
    fi
fi
# rock_dist from this working tree, without installing it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m rock_dist.perf.gpu_check --out "$out" "$@"
