#!/usr/bin/env python3
"""Thin entry point: same as `violet-ds extract-frames ...` (see its --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from violet_ds.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["extract-frames", *sys.argv[1:]])
