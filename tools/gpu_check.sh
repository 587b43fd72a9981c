#!/usr/bin/env bash
# One-shot GPU check: every CUDA path of violet_ds in one table (about 6-8 minutes on one H100/H200).
#   bash tools/gpu_check.sh            # GPU mode when CUDA is available, else the small CPU mode
#   bash tools/gpu_check.sh --mode cpu # what CI runs so the check never rots
# Runs the CUDA tests first (they skip on a machine without CUDA), then `violet-ds bench gpu`.
# Extra arguments go to `violet-ds bench gpu` (see `violet-ds bench gpu --help`).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${GPU_CHECK_OUT:-runs/bench}"
mkdir -p "$out_dir"
started=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda.py tests/test_models_video_swin.py 2>&1 \
    | tee "$out_dir/gpu_check_tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
python3 -m violet_ds.cli bench gpu --output "$out_dir/gpu_check.json" "$@" 2>&1 | tee "$out_dir/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - started )) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
