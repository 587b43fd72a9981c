#!/usr/bin/env bash
# Install violet_ds with its test dependencies, then run the default (fast) test suite.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --root-user-action=ignore -r requirements.txt -r requirements-test.txt -e .
export DS_ACCELERATOR=cpu
# bytecode once, up front: many tests start violet-ds processes, and where PYTHONDONTWRITEBYTECODE is set each would
# compile the package's sources again (about 0.6 s a process)
python3 -m compileall -q violet_ds tests > /dev/null
python3 -m pytest "$@"
