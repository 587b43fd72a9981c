#!/usr/bin/env bash
# Install violet_ds with its test dependencies, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -r requirements.txt -r requirements-test.txt -e .
export DS_ACCELERATOR=cpu
python3 -m pytest "$@"
