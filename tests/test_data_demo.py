"""Demo data generator (deterministic, official formats, motion needs several frames)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from violet_ds.commands.data import make_demo_data
from violet_ds.data import annotations as ann
from violet_ds.data.tsv import validate_tsv

SMALL = dict(num_videos=25, num_images=6, num_frames=5, size=32, workers=1)


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in (".tsv", ".json", ".txt", ".lineidx")}


def test_demo_layout_formats_and_determinism(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert make_demo_data(out=str(first), seed=4, **SMALL) == 0
    assert make_demo_data(out=str(second), seed=4, **SMALL) == 0
    digest = _digest(first)
    assert digest == _digest(second)
    for name in ("txt_pretrain.json", "txt_image.json", "txt_retrieval.json", "txt_caption.json", "txt_qamc.json",
                 "txt_capmc.json", "txt_qaoe.json", "txt_fib.json", "txt_action.json", "demo.json",
                 "tokenizer/vocab.txt", "tokenizer/tokenizer.json", "video_000.tsv", "image_000.tsv"):
        assert name in digest, name
    for shard in list(first.glob("video_*.tsv")) + list(first.glob("image_*.tsv")):
        report = validate_tsv(shard, decode=True, progress=False)
        assert report["ok"], report["error"]
    assert validate_tsv(first / "video_000.tsv", progress=False)["min_frames"] == 5
    # every file loads through the official-format loaders
    assert ann.detect_format(first / "txt_pretrain.json") == "pretrain"
    assert ann.detect_format(first / "txt_qamc.json") == "mc_qa"
    assert ann.detect_format(first / "txt_qaoe.json") == "oe_qa"
    assert ann.detect_format(first / "txt_fib.json") == "fib"
    assert ann.detect_format(first / "txt_action.json") == "action"
    assert ann.load_pretrain_captions(first / "txt_image.json", "train")
    # motion questions exist and their answers are directions (needs more than one frame)
    oe = ann.load_oe_qa(first / "txt_qaoe.json", "train")
    motion = [r for r in oe.records if r.question.startswith("which way")]
    assert motion and {oe.vocab[r.answer] for r in motion} <= {"left", "right", "up", "down", "still"}
    labels = [r.label for r in ann.load_action(first / "txt_action.json", "train").records]
    assert len(set(labels)) >= 3
    assert make_demo_data(out=str(first), **SMALL) == 1  # refuses to overwrite without force
    assert make_demo_data(out=str(first), seed=5, force=True, **SMALL) == 0
    assert _digest(first) != digest


def test_demo_motion_is_visible_in_frames(tmp_path):
    from violet_ds.data.datasets import ActionDataset

    root = tmp_path / "demo"
    make_demo_data(out=str(root), **SMALL)
    dataset = ActionDataset(str(root / "video_*.tsv"), root / "txt_action.json", "train", num_frames=5, size=32,
                            spatial="resize")
    for index in range(len(dataset)):
        sample = dataset[index]
        video = sample["video"].float()
        change = (video[-1] - video[0]).abs().mean()
        if sample["label"] == 4:  # still
            assert change < 3, change
        else:
            assert change > 3, change


def test_demo_motion_captions_name_only_the_motion(tmp_path):
    from violet_ds.data.demo import DemoVideo, build_annotations

    videos = [DemoVideo("demo0000", "red", "circle", "small", "left", "train"),
              DemoVideo("demo0001", "blue", "square", "big", "still", "train")]
    plain = build_annotations(videos, [], seed=0)["txt_pretrain.json"]["train"]
    files = build_annotations(videos, [], seed=0, motion_captions=2)["txt_pretrain.json"]["train"]
    assert files["demo0000"][:3] == plain["demo0000"]
    assert files["demo0000"][3:] == ["something moves left", "an object moving left"]
    assert files["demo0001"][3:] == ["something stays still", "an object staying still"]
    for caption in files["demo0000"][3:] + files["demo0001"][3:]:
        assert not {"red", "blue", "circle", "square", "small", "big"} & set(caption.split())


def test_demo_sequences_move_in_the_order_their_captions_say(tmp_path):
    import json

    import numpy as np

    from violet_ds.data.datasets import PretrainDataset
    from violet_ds.data.demo import DemoVideo, build_annotations, render_clip
    from violet_ds.data.tokenizer import Tokenizer

    root = tmp_path / "demo"
    make_demo_data(out=str(root), num_sequences=12, **SMALL)
    captions = json.loads((root / "txt_pretrain.json").read_text())
    sequences = {video: texts for video, texts in captions["train"].items() if video.startswith("seq")}
    assert len(sequences) == 12 and not any(v.startswith("seq") for v in captions["val"])
    # the 12 ordered pairs of distinct moves, once each, and no downstream file names a sequence
    pairs = {tuple(texts[0].split(" moves ")[1].split(" then ")) for texts in sequences.values()}
    assert len(pairs) == 12 and all(a != b for a, b in pairs)
    for name in ("txt_qamc.json", "txt_retrieval.json", "txt_action.json", "txt_qaoe.json"):
        assert "seq0" not in (root / name).read_text()
    dataset = PretrainDataset(str(root / "video_*.tsv"), root / "txt_pretrain.json", "train",
                              Tokenizer(root / "tokenizer"), num_frames=5, size=32, train=False, spatial="resize")
    assert sum(r.video.startswith("seq") for r in dataset.records) == 12
    # the shape's centre follows the first move over the first half and the second over the second half
    clip = render_clip("red", "square", "big", "left", 9, 64, np.random.default_rng(0), then="up")
    red = (clip[..., 0] > 200) & (clip[..., 1] < 100)
    centres = np.array([[np.nonzero(f)[1].mean(), np.nonzero(f)[0].mean()] for f in red])
    first, second = centres[4] - centres[0], centres[8] - centres[4]
    assert first[0] < -10 and abs(first[1]) < 1, first
    assert second[1] < -10 and abs(second[0]) < 1, second
    plain = build_annotations([DemoVideo("demo0000", "red", "circle", "small", "left", "train")], [], seed=0)
    with_sequence = build_annotations([DemoVideo("demo0000", "red", "circle", "small", "left", "train")], [], seed=0,
                                      sequences=[DemoVideo("seq0000", "red", "circle", "small", "up", "train", "down")])
    assert {k: v for k, v in with_sequence.items() if k != "txt_pretrain.json"} == \
        {k: v for k, v in plain.items() if k != "txt_pretrain.json"}
    assert with_sequence["txt_pretrain.json"]["train"]["seq0000"][0] == "a small red circle moves up then down"
