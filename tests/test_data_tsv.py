"""TSV shards: reading the official fixtures, writing, indexing, validating, and every bad-input case."""

from __future__ import annotations

import os
from multiprocessing.reduction import ForkingPickler
import shutil
from pathlib import Path

import pytest
import torch

from violet_ds.data.frames import decode_frames, decode_jpeg
from violet_ds.commands import data as data_commands
from violet_ds.data.tsv import (TSVError, TSVFile, TSVWriter, build_lineidx, lineidx_path, read_lineidx,
                                resolve_tsv_paths, validate_tsv)


def _copy_fixture(official_dir: Path, name: str, tmp_path: Path) -> Path:
    source = next(official_dir.rglob(name))
    target = tmp_path / name
    shutil.copy(source, target)
    shutil.copy(lineidx_path(source), lineidx_path(target))
    return target


def _write_rows(path: Path, rows: list[list[str]]) -> Path:
    with TSVWriter(path) as writer:
        for row in rows:
            writer.write(row)
    return path


def test_official_msrvtt_tsv_decodes(official_dir):
    tsv = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    assert len(tsv) == 10
    assert tsv.frame_column == 1
    for row in range(len(tsv)):
        key, frames = tsv.frames(row)
        assert key.startswith("video70")
        video = decode_frames(frames)
        assert video.shape == (5, 3, 240, 320) and video.dtype == torch.uint8
    assert tsv.seek("video7012")[0] == "video7012"
    assert sorted(tsv.keys()) == [f"video70{i:02d}" for i in range(10, 20)]


def test_official_cc3m_tsv_decodes(official_dir):
    from PIL import Image
    import base64
    import io

    tsv = TSVFile(official_dir / "_data" / "img_cc3m_val.tsv")
    assert len(tsv) == 50
    for row in range(len(tsv)):
        key, frames = tsv.frames(row)
        assert len(frames) == 1
        image = decode_jpeg(frames[0])
        with Image.open(io.BytesIO(base64.b64decode(frames[0]))) as reference:
            assert image.shape == (3, reference.height, reference.width)


def test_validator_accepts_fixtures(official_dir):
    for name in ("_tools/msrvtt.tsv", "_data/img_cc3m_val.tsv"):
        report = validate_tsv(official_dir / name, decode=True, progress=False)
        assert report["ok"], report["error"]
    assert validate_tsv(official_dir / "_tools/msrvtt.tsv", progress=False)["frames"] == 50
    assert data_commands.validate_tsv(str(official_dir / "_tools" / "msrvtt.tsv")) == 0


def test_writer_roundtrip_and_atomicity(tmp_path):
    path = _write_rows(tmp_path / "a.tsv", [["v1", "x", "y"], ["v2", "z"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.lineidx", "a.tsv"]
    tsv = TSVFile(path)
    assert tsv[0] == ["v1", "x", "y"] and tsv.seek("v2") == ["v2", "z"] and tsv[-1] == ["v2", "z"]
    with pytest.raises(RuntimeError):
        with TSVWriter(tmp_path / "b.tsv") as writer:
            writer.write(["v1", "x"])
            raise RuntimeError("crash mid-shard")
    assert not (tmp_path / "b.tsv").exists() and not any("tmp" in p.name for p in tmp_path.iterdir())
    with TSVWriter(tmp_path / "c.tsv") as writer, pytest.raises(ValueError, match="tab or newline"):
        writer.write(["v1", "bad\tvalue"])


def test_missing_index_is_built_and_keyed_or_json_indexes_read(tmp_path, official_dir):
    source = official_dir / "_tools" / "msrvtt.tsv"
    target = tmp_path / "m.tsv"
    shutil.copy(source, target)
    tsv = TSVFile(target)
    assert len(tsv) == 10 and lineidx_path(target).is_file()
    assert lineidx_path(target).read_text() == lineidx_path(source).read_text()
    build_lineidx(target, with_keys=True)
    offsets, keys = read_lineidx(lineidx_path(target))
    assert keys[2] == "video7012" and TSVFile(target).seek("video7012")[0] == "video7012"
    import json

    mapping = {k: int(o) for k, o in zip(keys, offsets)}
    lineidx_path(target).write_text(json.dumps(mapping))
    assert TSVFile(target).seek("video7019")[0] == "video7019"
    assert data_commands.build_index(str(target), force=True) == 0


def test_violetv2_layout_extra_column(tmp_path, official_dir):
    official = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    rows = [[official[i][0], '{"num_frames": 5}', *official[i][1:]] for i in range(3)]
    path = _write_rows(tmp_path / "v2.tsv", rows)
    tsv = TSVFile(path)
    assert tsv.frame_column == 2
    assert tsv.frames(1)[1] == official.frames(1)[1]
    report = validate_tsv(path, progress=False)
    assert report["ok"] and report["frame_column"] == 2 and report["frames"] == 15


def test_truncated_tsv(tmp_path, official_dir):
    path = _copy_fixture(official_dir, "msrvtt.tsv", tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])  # the last row loses its end
    tsv = TSVFile(path)
    with pytest.raises(TSVError, match=r"m?srvtt.tsv: row 9 .*truncated"):
        tsv[9]
    assert tsv[8][0]  # earlier rows are still fine
    report = validate_tsv(path, progress=False)
    assert not report["ok"] and "row 9" in report["error"] and "truncated" in report["error"]
    with pytest.raises(TSVError, match="row 9"):
        build_lineidx(path, out_path=tmp_path / "x.lineidx")
    # truncated before the last offset: caught when the index is loaded
    path.write_bytes(data[:200000])
    with pytest.raises(TSVError, match="truncated TSV or stale index"):
        len(TSVFile(path))


def test_lineidx_pointing_mid_row(tmp_path, official_dir):
    path = _copy_fixture(official_dir, "msrvtt.tsv", tmp_path)
    index = lineidx_path(path)
    offsets = index.read_text().split()
    offsets[3] = str(int(offsets[3]) + 17)
    index.write_text("\n".join(offsets) + "\n")
    tsv = TSVFile(path)
    with pytest.raises(TSVError, match="row 3 offset .* does not start a row"):
        tsv[3]
    with pytest.raises(TSVError, match="row 2 spans several lines|row 2"):
        tsv[2]
    report = validate_tsv(path, progress=False)
    assert not report["ok"] and "row 3" in report["error"]
    assert data_commands.validate_tsv(str(path)) == 1


def test_lineidx_missing_a_row(tmp_path, official_dir):
    path = _copy_fixture(official_dir, "msrvtt.tsv", tmp_path)
    index = lineidx_path(path)
    offsets = index.read_text().split()
    del offsets[4]
    index.write_text("\n".join(offsets) + "\n")
    with pytest.raises(TSVError, match="row 3 spans several lines"):
        TSVFile(path)[3]
    assert "row 4" in validate_tsv(path, progress=False)["error"]


def test_per_process_reopen_and_pickling(tmp_path, monkeypatch):
    path = _write_rows(tmp_path / "p.tsv", [["a", "1"], ["b", "2"]])
    tsv = TSVFile(path)
    assert tsv[0] == ["a", "1"]
    handle = tsv._handle
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)
    assert tsv[1] == ["b", "2"]
    assert tsv._handle is not handle and not handle.closed  # the parent's handle is left alone
    # what a spawned DataLoader worker receives: the reduction used by torch.multiprocessing
    clone = ForkingPickler.loads(ForkingPickler.dumps(tsv))
    assert clone._handle is None and clone[0] == ["a", "1"]


def test_parallel_worker_reads(tmp_path):
    from torch.utils.data import DataLoader, Dataset

    path = _write_rows(tmp_path / "w.tsv", [[f"v{i}", "x" * (i * 37 % 500 + 1)] for i in range(64)])
    tsv = TSVFile(path)
    tsv[0]  # the parent opens the file before the workers fork

    class Rows(Dataset):
        def __len__(self):
            return len(tsv)

        def __getitem__(self, index):
            return tsv[index][0]

    loaded = [key for batch in DataLoader(Rows(), batch_size=4, num_workers=2) for key in batch]
    assert loaded == [f"v{i}" for i in range(64)]


def test_resolve_paths(tmp_path):
    for name in ("s_000.tsv", "s_001.tsv"):
        _write_rows(tmp_path / name, [["a", "b"]])
    assert len(resolve_tsv_paths(str(tmp_path / "s_*.tsv"))) == 2
    assert len(resolve_tsv_paths(f"{tmp_path / 's_000.tsv'},{tmp_path / 's_001.tsv'}")) == 2
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        resolve_tsv_paths(str(tmp_path / "nothing.tsv"))


@pytest.mark.parametrize("command", ["extract-frames", "extract-images", "build-index", "validate-tsv",
                                     "convert-pickle", "make-demo-data", "bench data"])
def test_data_commands_build_parsers(command):
    from violet_ds.cli import build_parser, load_command

    parser = build_parser(command, load_command(command))
    assert parser.description


def test_validate_command_through_cli(official_dir, tmp_path, capsys):
    from violet_ds.cli import main

    path = _copy_fixture(official_dir, "msrvtt.tsv", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["validate-tsv", "--tsv", str(path)])
    assert exit_info.value.code == 0
    assert "10 rows, 50 frames" in capsys.readouterr().out
    lineidx_path(path).write_text("0\n5\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate-tsv", "--tsv", str(path)])
    assert exit_info.value.code == 1
    assert "BAD" in capsys.readouterr().out


def test_row_without_frames_and_without_image_columns(tmp_path):
    path = _write_rows(tmp_path / "n.tsv", [["only_id"], ["other", "not-an-image"]])
    tsv = TSVFile(path, frame_column=1)
    with pytest.raises(TSVError, match=r"n.tsv: row 0 \('only_id'\) has no frame columns"):
        tsv.frames(0)
    with pytest.raises(TSVError, match="no column looks like a base64 JPEG"):
        _ = TSVFile(path).frame_column
    assert "no column looks like" in validate_tsv(path, progress=False)["error"]
