#!/usr/bin/env bash
# One-shot GPU check: every CUDA path of violet_ds in one table, within GPU_CHECK_BUDGET_S seconds (default 480).
#   bash tools/gpu_check.sh            # GPU mode when CUDA is available, else the small CPU mode
#   bash tools/gpu_check.sh --mode cpu # what CI runs so the check never rots
# Runs the CUDA model tests first (they skip on a machine without CUDA), then `violet-ds bench gpu` with what is
# left of the budget; the engine steps of tests/test_cuda.py are not rerun here: the bench's step rows run the
# same engine paths and are checked the same way (finite loss, device, precision, the optimizer asked for).
# Extra arguments go to `violet-ds bench gpu` (see `violet-ds bench gpu --help`; a `--budget_s` there wins).
# Output: $GPU_CHECK_OUT (default runs/bench): gpu_check.json, gpu_check.log, gpu_check_tests.log, and
# inductor_cache/ (the compiled blocks' kernels, unless TORCHINDUCTOR_CACHE_DIR is set).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${GPU_CHECK_OUT:-runs/bench}"
total="${GPU_CHECK_BUDGET_S:-480}"
mkdir -p "$out_dir"
# compiled kernels kept next to the results: a rerun on the same machine (`--rows ...`) compiles from this cache
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$out_dir/inductor_cache}"
started=$(date +%s)
# GPU_CHECK_TESTS: the test files to run first (the CPU-mode check in the test suite runs only the CUDA file,
# whose tests skip there, not the Video Swin tests the suite runs anyway)
read -r -a test_files <<< "${GPU_CHECK_TESTS:-tests/test_cuda.py tests/test_models_video_swin.py}"
python3 -m pytest -q -p no:cacheprovider -m "not slow" -k "not engine_step" "${test_files[@]}" 2>&1 | tee "$out_dir/gpu_check_tests.log" | tail -n 15
tests_rc=${PIPESTATUS[0]}
left=$(( total - ($(date +%s) - started) ))
(( left < 60 )) && left=60
python3 -m violet_ds.cli bench gpu --output "$out_dir/gpu_check.json" --budget_s "$left" "$@" 2>&1 \
    | tee "$out_dir/gpu_check.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu_check: tests rc=$tests_rc, bench rc=$bench_rc, $(( $(date +%s) - started )) s"
exit $(( tests_rc != 0 || bench_rc != 0 ))
