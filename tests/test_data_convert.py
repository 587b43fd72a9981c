"""Official pickles -> TSV / npz through the restricted unpickler; malicious pickles are refused."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from violet_ds.commands.data import convert_pickle
from violet_ds.data.convert import load_vq_tokens
from violet_ds.data.safe_pickle import UnsafePickleError, load_restricted_pickle
from violet_ds.data.tsv import TSVFile, validate_tsv

REPO = Path(__file__).resolve().parents[1]


def test_official_vq_pickles_convert(official_dir, tmp_path):
    for source, frames in ((official_dir / "_tools" / "msrvtt_vq.pkl", 5), (official_dir / "_data" / "vq_cc3m.pkl", 1),
                           (official_dir / "_data" / "vq_webvid2.5m.pkl", None)):
        out = tmp_path / (source.stem + ".npz")
        assert convert_pickle(str(source), str(out)) == 0
        tokens = load_vq_tokens(out)
        assert tokens
        for array in tokens.values():
            assert array.dtype == np.int16 and array.shape[1:] == (7, 7)
            assert 0 <= array.min() and array.max() < 8192
            if frames is not None:
                assert array.shape[0] == frames
    msrvtt = load_vq_tokens(tmp_path / "msrvtt_vq.npz")
    assert set(msrvtt) == set(TSVFile(official_dir / "_tools" / "msrvtt.tsv").keys())


def test_frames_pickle_converts_to_tsv(official_dir, tmp_path):
    official = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    data = {key: official.frames_by_key(key) for key in official.keys()[:3]}
    source = tmp_path / "frames.pkl"
    source.write_bytes(pickle.dumps(data))
    assert convert_pickle(str(source)) == 0
    converted = TSVFile(tmp_path / "frames.tsv")
    assert converted.keys() == list(data) and converted.frames_by_key(official.keys()[1]) == data[official.keys()[1]]
    assert validate_tsv(tmp_path / "frames.tsv", progress=False)["ok"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch should_not_exist",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = tmp_path / "evil.pkl"
    payload.write_bytes(pickle.dumps({"v": _Exploit()}))
    with pytest.raises(UnsafePickleError, match=r"evil.pkl: refuses to load global .*system"):
        load_restricted_pickle(payload)
    assert convert_pickle(str(payload)) == 1
    assert not (tmp_path / "should_not_exist").exists()
    with pytest.raises(pickle.UnpicklingError, match="not a valid pickle"):
        (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
        load_restricted_pickle(tmp_path / "junk.pkl")


def test_no_plain_pickle_load_in_the_package():
    offenders = []
    for path in (REPO / "violet_ds").rglob("*.py"):
        text = path.read_text()
        if re.search(r"\bpickle\.loads?\(", text) or re.search(r"torch\.load\((?![^)]*weights_only=True)", text):
            offenders.append(str(path.relative_to(REPO)))
    assert not [o for o in offenders if o.startswith("violet_ds/data")], offenders
