#!/usr/bin/env python3
"""Thin entry point: same as `violet-ds make-demo-data ...` (see its --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from violet_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["make-demo-data", *sys.argv[1:]])
