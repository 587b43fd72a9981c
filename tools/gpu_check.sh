#!/usr/bin/env bash
# One-shot GPU check: every CUDA path of violet_ds in one table, within GPU_CHECK_BUDGET_S seconds (default 480).
#   bash tools/gpu_check.sh            # GPU mode when CUDA is available, else the small CPU mode
#   bash tools/gpu_check.sh --mode cpu # what CI runs so the check never rots
# Runs the CUDA model tests first (they skip on a machine without CUDA), then `violet-ds bench gpu` with what is
# left of the budget; the engine steps of tests/test_cuda.py are not rerun here: the bench's step rows run the
# same engine paths and are checked the same way (finite loss, device, precision, the optimizer asked for).
# Extra arguments go to `violet-ds bench gpu` (see `violet-ds bench gpu --help`; a `--budget_s` there wins).
# Output: $GPU_CHECK_OUT (default runs/bench): gpu_check.json, gpu_check.log, gpu_check_tests.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${GPU_CHECK_OUT:-runs/bench}"
total="${GPU_CHECK_BUDGET_S:-480}"
mkdir -p "$out_dir"
started=$(date +%s)
python3 -m pytest -q -p no:cacheprovider -m "not slow" -k "not engine_step" tests/test_cuda.py \
    tests/test_models_video_swin.py 2>&1 | tee "$out_dir/gpu_check_tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
left=$(( total - ($(date +%s) - started) ))
(( left < 60 )) && left=60
python3 -m violet_ds.cli bench gpu --output "$out_dir/gpu_check.json" --budget_s "$left" "$@" 2>&1 \
    | tee "$out_dir/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - started )) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
