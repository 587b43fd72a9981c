"""Checks before step 1, so that a run fails in seconds instead of after hours of compute.

`preflight_paths` (before any model is built): the run and checkpoint directories are writable, every
configured split's TSVs and annotation files exist, the `.lineidx` of each training TSV is spot-checked
(first, last and a few sampled rows must start and end a whole row: a stale, shifted or truncated
index is named as such, not found later as "video X is in none of the TSVs"), the tokenizer directory
and `run.init_from` / `model.weights` are readable (a DeepSpeed checkpoint's files are checked with
the safe loader). `check_split_sizes` (after the datasets are built): every configured split has
samples, naming the files when one has none.
"""

from __future__ import annotations

import glob
import os
import random
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

SAMPLED_ROWS = 6


class PreflightError(ValueError):
    """A configured input or output cannot work; the message names it and what to do."""


def _writable(directory: Path, what: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".violet_ds_write_test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PreflightError(f"{what} {directory} is not writable ({error.strerror or error}); fix its permissions "
                             "or choose another --run.output_dir") from None


def spot_check_tsv(path: Path, rows: int = SAMPLED_ROWS, seed: int = 0) -> int:
    """First, last and `rows` sampled rows of a TSV read back whole through its `.lineidx`; returns the row count."""
    from violet_ds.data.tsv import TSVError, TSVFile

    tsv = TSVFile(path)
    try:
        count = len(tsv)
        if count == 0:
            raise PreflightError(f"{path}: the TSV has no rows")
        picks = {0, count - 1} | set(random.Random(seed).sample(range(count), min(rows, count)))
        for row in sorted(picks):
            if tsv.read_bytes(row).endswith(b"\r"):
                raise PreflightError(f"{path}: row {row} ends with a carriage return: the TSV has Windows (CRLF) "
                                     "line endings; convert it (`sed -i 's/\\r$//' FILE.tsv`) and rebuild its "
                                     "index (`violet-ds build-index --force`)")
    except TSVError as error:
        raise PreflightError(f"{error} [validate the whole file with `violet-ds validate-tsv {path}`]") from None
    finally:
        tsv.close()
    return count


def _readable(path: Path, what: str) -> None:
    if not path.exists():
        raise PreflightError(f"{what} {path} does not exist")
    if path.is_file():
        try:
            with open(path, "rb") as handle:
                handle.read(1)
        except OSError as error:
            raise PreflightError(f"{what} {path} is not readable ({error.strerror or error})") from None
    elif not os.access(path, os.R_OK | os.X_OK):
        raise PreflightError(f"{what} {path} is not readable")


def _check_init_from(path: str) -> None:
    from . import checkpoint as ckpt

    target = Path(path)
    _readable(target, "run.init_from")
    if target.is_dir():
        try:
            checkpoint_dir, tag = ckpt.locate(target)
        except FileNotFoundError as error:
            raise PreflightError(f"run.init_from: {error}") from None
        tag_dir = checkpoint_dir / tag
        if not (tag_dir / ckpt.COMPLETE_MARKER).is_file():
            raise PreflightError(f"run.init_from: checkpoint {tag_dir} is incomplete (its save was interrupted)")
        ckpt.check_tag_dir(tag_dir)


def preflight_paths(data: Any, run: Any, model: Any, run_dir: Path, splits: Iterable[str] = ("train", "val", "test"),
                    resuming: bool = False, reads_frames: bool = True) -> dict:
    """All file-level checks that need no model; returns {tsv path: rows} of the spot-checked training TSVs.

    `reads_frames=False` (a task that reads only pre-extracted VQ tokens, e.g. VIMPAC): a source's token
    file (`vq`, else `tsv`) must exist; its frame TSV is not read, so it is not checked."""
    from violet_ds.data.tsv import resolve_tsv_paths

    run_dir = Path(run_dir)
    _writable(run_dir, "run directory")
    _writable(run_dir / "checkpoints", "checkpoint directory")
    checked = {}
    for split in splits:
        for number, source in enumerate(getattr(data, split, None) or []):
            where = f"data.{split}[{number}]"
            if not reads_frames:
                key, tokens = ("vq", source.vq) if getattr(source, "vq", None) else ("tsv", source.tsv)
                if not glob.glob(str(tokens)):
                    raise PreflightError(f"{where}.{key}: no file matches {tokens!r}")
                if source.annotations:
                    _readable(Path(source.annotations), f"{where}.annotations")
                continue
            try:
                paths = resolve_tsv_paths(source.tsv)
            except FileNotFoundError as error:
                raise PreflightError(f"{where}.tsv: {error}") from None
            if source.annotations:
                _readable(Path(source.annotations), f"{where}.annotations")
            for path in paths:
                if split == "train":
                    checked[str(path)] = spot_check_tsv(path)
                else:
                    _readable(path, f"{where}.tsv")
    _readable(Path(data.tokenizer), "data.tokenizer")
    if getattr(model, "weights", None):
        _readable(Path(model.weights), "model.weights")
    if run.init_from and not resuming:
        _check_init_from(run.init_from)
    return checked


def check_split_sizes(split: str, datasets: Mapping[str, Any], sources: Optional[list] = None) -> None:
    """Every dataset of a configured split has at least one sample."""
    for name, dataset in datasets.items():
        if len(dataset) == 0:
            files = ", ".join(f"{s.tsv} + {s.annotations} (split {s.split!r})" for s in (sources or []))
            raise PreflightError(f"data.{split}: {name!r} has no samples; check that the annotations list videos "
                                 f"of the TSVs under that split name: {files or 'no sources'}")
    if sources and not datasets:
        raise PreflightError(f"data.{split}: no dataset was built from {len(sources)} source(s)")


class preserved_rng:
    """Context manager: the python/numpy/torch RNG states are the same after the block as before it."""

    def __enter__(self):
        import numpy as np
        import torch

        self._states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        return self

    def __exit__(self, *exc) -> None:
        import numpy as np
        import torch

        python_state, numpy_state, torch_state = self._states
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)


def _parts(dataset: Any) -> list:
    inner = getattr(dataset, "dataset", None)
    if inner is not None and inner is not dataset:
        return _parts(inner)
    if hasattr(dataset, "datasets") and not hasattr(dataset, "bad_sample_report"):
        return [part for sub in dataset.datasets for part in _parts(sub)]
    return [dataset]


def bad_sample_totals(datasets: Mapping[str, Any], world: Any) -> dict:
    """Samples skipped as unreadable, summed over DataLoader workers (shared counters) and ranks."""
    import torch

    totals = [0, 0]
    for dataset in datasets.values():
        for part in _parts(dataset):
            counts = getattr(part, "bad_sample_counts", None)
            if callable(counts):
                bad, seen = counts()
                totals[0] += bad
                totals[1] += seen
    values = torch.tensor(totals, dtype=torch.float64)
    if getattr(world, "distributed", False) and torch.distributed.is_initialized():
        values = values.to(world.device)
        torch.distributed.all_reduce(values)
    bad, seen = (int(v) for v in values.cpu().tolist())
    return {"bad": bad, "seen": seen}
