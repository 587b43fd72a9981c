"""Annotation loaders: every official format loads; malformed records name file and record."""

from __future__ import annotations

import json

import pytest

from violet_ds.data import annotations as ann


def test_every_official_annotation_loads(official_dir):
    data = official_dir / "_data"
    for name in ("txt_cc3m.json", "txt_webvid2.5m.json"):
        for split in ("train", "val"):
            records = ann.load_pretrain_captions(data / name, split)
            assert records and all(r.captions and isinstance(r.captions[0], str) for r in records)
    for split in ("train", "val", "test"):
        assert len(ann.load_retrieval(data / "txt_msrvtt-retrieval.json", split)) >= 50
        mc = ann.load_mc_qa(data / "txt_tgif-action.json", split, num_options=5)
        assert all(len(r.options) == 5 and 0 <= r.answer < 5 and r.question for r in mc)
        oe = ann.load_oe_qa(data / "txt_msvd-qa.json", split)
        assert len(oe.vocab) == 1000 and all(-1 <= r.answer < 1000 for r in oe.records)
    assert ann.detect_format(data / "txt_tgif-action.json") == "mc_qa"
    assert ann.detect_format(data / "txt_msvd-qa.json") == "oe_qa"
    assert ann.detect_format(data / "txt_cc3m.json") == "pretrain"
    assert ann.detect_format(data / "txt_msrvtt-retrieval.json") == "text_video"


def _write(tmp_path, content, name="a.json"):
    path = tmp_path / name
    path.write_text(json.dumps(content) if not isinstance(content, str) else content)
    return path


def test_malformed_records_name_file_and_record(tmp_path):
    path = _write(tmp_path, {"train": [{"video": "v1", "caption": "ok"}, {"video": "v2"}]})
    with pytest.raises(ann.AnnotationError, match=r"a.json: train\[1\]: missing key 'caption'"):
        ann.load_retrieval(path, "train")
    with pytest.raises(ann.AnnotationError, match="no split 'test'"):
        ann.load_retrieval(path, "test")
    bad_json = _write(tmp_path, "{not json", "b.json")
    with pytest.raises(ann.AnnotationError, match="b.json: invalid JSON"):
        ann.load_retrieval(bad_json)
    mc = _write(tmp_path, {"val": [{"video": "v", "question": "q", "option_0": "a", "option_1": "b", "answer": 2}]}, "c.json")
    with pytest.raises(ann.AnnotationError, match=r"c.json: val\[0\]: answer 2 is not an option index"):
        ann.load_mc_qa(mc, "val")
    oe = _write(tmp_path, {"train": [{"video": "v", "question": "q", "answer": "yes"}], "vocab": ["yes"]}, "d.json")
    with pytest.raises(ann.AnnotationError, match=r"d.json: train\[0\]: 'answer' must be an integer"):
        ann.load_oe_qa(oe)
    no_vocab = _write(tmp_path, {"train": [{"video": "v", "question": "q", "answer": 0}]}, "e.json")
    with pytest.raises(ann.AnnotationError, match="e.json: top-level 'vocab'"):
        ann.load_oe_qa(no_vocab)
    pre = _write(tmp_path, {"train": {"v1": []}}, "f.json")
    with pytest.raises(ann.AnnotationError, match=r"f.json: train\['v1'\]"):
        ann.load_pretrain_captions(pre)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ann.load_retrieval(tmp_path / "missing.json")


def test_oe_unanswerable_fib_and_action(tmp_path):
    oe = _write(tmp_path, {"test": [{"video": "v", "question": "q", "answer": 0},
                                    {"video": "v", "question": "q", "answer": 5},
                                    {"video": "v", "question": "q", "answer": -1, "answer_text": "x"}],
                           "vocab": ["a", "b"]})
    loaded = ann.load_oe_qa(oe, "test")
    assert [r.answer for r in loaded.records] == [0, -1, -1] and loaded.unanswerable == 2
    assert loaded.records[2].answer_text == "x"
    fib = _write(tmp_path, {"train": [{"video": "v", "question": "a man _____ the door", "answer": 0}],
                            "vocab": ["opens"]}, "fib.json")
    assert ann.load_fib(fib).records[0].question.count("_") == 5
    assert ann.detect_format(fib) == "fib"
    no_blank = _write(tmp_path, {"train": [{"video": "v", "question": "no blank", "answer": 0}], "vocab": ["x"]}, "nb.json")
    with pytest.raises(ann.AnnotationError, match=r"nb.json: train\[0\]: question must contain exactly one blank"):
        ann.load_fib(no_blank)
    action = _write(tmp_path, {"train": [{"video": "v", "label": 3}], "labels": ["a", "b"]}, "act.json")
    with pytest.raises(ann.AnnotationError, match=r"act.json: train\[0\]: label 3 outside"):
        ann.load_action(action)


def test_msrvtt_mc_style_and_caption_lists(tmp_path):
    path = _write(tmp_path, {"test": [{"video": "v", "option_0": "a dog runs", "option_1": "a cat sits", "answer": 1},
                                      {"video": "w", "options": ["x", "y"], "answer": 0}]})
    records = ann.load_mc_qa(path, "test")
    assert records[0].question == "" and records[0].options == ["a dog runs", "a cat sits"]
    assert records[1].options == ["x", "y"]
    captions = _write(tmp_path, {"val": [{"video": "v", "caption": ["one", "two"]}]}, "cap.json")
    assert [r.caption for r in ann.load_captioning(captions, "val")] == ["one", "two"]
