"""Datasets + collate on the official fixtures and on a small demo build; bad-sample policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from violet_ds.data.datasets import (ActionDataset, BadSampleLimitError, CaptionDataset, FiBDataset, MCQADataset,
                                     MissingVideoError, MixedDataset, OEQADataset, PretrainDataset, RetrievalDataset,
                                     VideoDataset, build_retrieval_eval, collate)
from violet_ds.data.frames import FrameDecodeError
from violet_ds.data.sampler import ResumableDistributedSampler
from violet_ds.data.tokenizer import Tokenizer
from violet_ds.data.tsv import TSVFile, TSVWriter


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from violet_ds.data.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo") / "demo"
    make_demo_data(out=str(root), num_videos=40, num_images=10, num_frames=6, size=32, workers=1)
    return root


@pytest.fixture(scope="module")
def demo_tokenizer(demo) -> Tokenizer:
    return Tokenizer(demo / "tokenizer")


def _check_common(batch, batch_size, frames, size):
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (batch_size, frames, 3, size, size)
    assert batch["index"].dtype == torch.long and batch["index"].shape == (batch_size,)
    assert isinstance(batch["video_id"], list) and len(batch["video_id"]) == batch_size


def test_pretrain_on_official_fixtures(official_dir, bert_dir, tmp_path):
    tokenizer = Tokenizer(bert_dir)
    images = PretrainDataset(official_dir / "_data" / "img_cc3m_val.tsv", official_dir / "_data" / "txt_cc3m.json",
                             "val", tokenizer, num_frames=4, size=64, max_text_len=32, kind="image", train=True)
    assert len(images) == 50
    batch = collate([images[0], images[1], images[2]])
    _check_common(batch, 3, 4, 64)
    assert torch.equal(batch["video"][:, 0], batch["video"][:, 3])  # one frame repeated
    assert batch["text_ids"].shape == (3, 32) and batch["text_ids"][:, 0].eq(tokenizer.cls_id).all()
    assert batch["text_mask"].sum(1).gt(2).all()
    # video-text with the VQ sidecar: tokens follow the sampled frames
    from violet_ds.data.convert import convert_pickle, load_vq_tokens

    convert_pickle(str(official_dir / "_tools" / "msrvtt_vq.pkl"), str(tmp_path / "vq.npz"))
    captions = tmp_path / "txt_msrvtt.json"
    keys = TSVFile(official_dir / "_tools" / "msrvtt.tsv").keys()
    captions.write_text(json.dumps({"train": {k: [f"caption of {k}", "another"] for k in keys}}))
    videos = PretrainDataset(official_dir / "_tools" / "msrvtt.tsv", captions, "train", tokenizer, num_frames=5,
                             size=64, vq=str(tmp_path / "vq.npz"), spatial="resize", train=False)
    sample = videos[3]
    assert sample["vq_tokens"].shape == (5, 7, 7) and sample["vq_tokens"].dtype == torch.long
    assert torch.equal(sample["vq_tokens"], torch.from_numpy(load_vq_tokens(tmp_path / "vq.npz")[keys[3]].astype(np.int64)))
    mixed = MixedDataset([videos, PretrainDataset(official_dir / "_data" / "img_cc3m_val.tsv",
                                                  official_dir / "_data" / "txt_cc3m.json", "val", tokenizer,
                                                  num_frames=5, size=64, kind="image")], weights=[2.0, 0.2])
    assert len(mixed) == 20 + 10
    assert mixed[25]["video"].shape == (5, 3, 64, 64) and mixed[25]["index"] == 25


def test_downstream_datasets_on_demo(demo, demo_tokenizer):
    tok, common = demo_tokenizer, dict(num_frames=4, size=32, max_text_len=16)
    tsv = str(demo / "video_*.tsv")
    mc = MCQADataset(tsv, demo / "txt_qamc.json", "train", tok, **common)
    batch = collate([mc[i] for i in range(3)])
    _check_common(batch, 3, 4, 32)
    assert batch["option_ids"].shape == (3, 5, 16) and batch["option_mask"].shape == (3, 5, 16)
    assert batch["answer"].dtype == torch.long and batch["answer"].lt(5).all()
    # question + option pairs: two [SEP]s per option
    assert batch["option_ids"].eq(tok.sep_id).sum(-1).eq(2).all()
    capmc = MCQADataset(tsv, demo / "txt_capmc.json", "val", tok, **common)
    assert capmc[0]["option_ids"].eq(tok.sep_id).sum(-1).eq(1).all()

    oe = OEQADataset(tsv, demo / "txt_qaoe.json", "test", tok, **common)
    answers = torch.tensor([r.answer for r in oe.records])
    assert oe.unanswerable > 0 and answers.eq(-1).sum() == oe.unanswerable
    sample = oe[[r.answer for r in oe.records].index(-1)]
    assert sample["answer"] == -1 and sample["answer_token"] == -1
    first = oe[0]
    assert first["answer_token"] == tok.token_id(oe.vocab[first["answer"]]) >= 0
    assert len(OEQADataset(tsv, demo / "txt_qaoe.json", "test", tok, train=True, **common)) == len(oe) - oe.unanswerable

    fib = FiBDataset(tsv, demo / "txt_fib.json", "train", tok, **common)
    assert fib[0]["text_ids"].eq(tok.mask_id).sum() == 1

    retrieval = RetrievalDataset(tsv, demo / "txt_retrieval.json", "train", tok, **common)
    batch = collate([retrieval[0], retrieval[1]])
    assert batch["text_ids"].shape == (2, 16)
    evaluation = build_retrieval_eval(tsv, demo / "txt_retrieval.json", "test", tok, **common)
    texts, videos = evaluation["texts"], evaluation["videos"]
    assert len(texts) >= len(videos) > 0
    for i in range(len(texts)):
        item = texts[i]
        assert videos.video_ids[item["video_index"]] == item["video_id"]
    text_batch = collate([texts[0], texts[1]])
    assert set(text_batch) == {"text_ids", "text_mask", "video_index", "video_id", "index"}
    assert collate([videos[0]])["video"].shape == (1, 4, 3, 32, 32)

    caption_train = CaptionDataset(tsv, demo / "txt_caption.json", "train", tok, **common)
    assert collate([caption_train[0]])["caption_ids"].shape == (1, 16)
    caption_eval = CaptionDataset(tsv, demo / "txt_caption.json", "test", tok, train=False, **common)
    assert isinstance(collate([caption_eval[0]])["captions"][0], list)

    action = ActionDataset(tsv, demo / "txt_action.json", "train", **common)
    assert action.num_classes == 5 and collate([action[0], action[1]])["label"].dtype == torch.long


def test_loader_with_workers_and_sampler(demo, demo_tokenizer):
    dataset = PretrainDataset(str(demo / "video_*.tsv"), demo / "txt_pretrain.json", "train", demo_tokenizer,
                              num_frames=4, size=32, max_text_len=16)
    sampler = ResumableDistributedSampler(len(dataset), rank=1, world=2, seed=3)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate)
    indices = torch.cat([batch["index"] for batch in loader]).tolist()
    assert indices == list(sampler)
    assert len(indices) == (len(dataset) + 1) // 2


def test_annotation_naming_missing_video(demo, demo_tokenizer, tmp_path):
    records = json.loads((demo / "txt_retrieval.json").read_text())
    records["train"].insert(0, {"video": "ghost_video", "caption": "nothing"})
    path = tmp_path / "ret.json"
    path.write_text(json.dumps(records))
    with pytest.raises(MissingVideoError, match=r"ret.json: train\[0\] names video 'ghost_video'"):
        RetrievalDataset(str(demo / "video_*.tsv"), path, "train", demo_tokenizer, num_frames=4, size=32)
    tolerant = RetrievalDataset(str(demo / "video_*.tsv"), path, "train", demo_tokenizer, num_frames=4, size=32,
                                max_bad_fraction=0.1)
    assert tolerant.missing_videos == ["ghost_video"] and len(tolerant) == len(records["train"]) - 1
    records["train"] = [{"video": f"ghost{i}", "caption": "x"} for i in range(5)] + records["train"][:5]
    path.write_text(json.dumps(records))
    with pytest.raises(BadSampleLimitError, match="more than max_bad_fraction"):
        RetrievalDataset(str(demo / "video_*.tsv"), path, "train", demo_tokenizer, num_frames=4, size=32,
                         max_bad_fraction=0.2)


def _tsv_with_bad_rows(demo: Path, out: Path, bad_rows: set[int]) -> Path:
    source = TSVFile(sorted(demo.glob("video_*.tsv"))[0])
    with TSVWriter(out) as writer:
        for row in range(len(source)):
            key, frames = source.frames(row)
            if row in bad_rows:
                frames = frames[:1] + ["/9j/" + "A" * 40] + frames[2:]  # base64 JPEG header, no image
            writer.write([key, *frames])
    return out


def test_undecodable_frame_is_reported_or_skipped(demo, demo_tokenizer, tmp_path):
    tsv = _tsv_with_bad_rows(demo, tmp_path / "bad.tsv", {2})
    ids = TSVFile(tsv).keys()
    strict = VideoDataset(str(tsv), ids, num_frames=6, size=32)
    with pytest.raises(FrameDecodeError, match=rf"sample 2 \(video '{ids[2]}', .*bad.tsv row 2\).*frame 1"):
        strict[2]
    tolerant = VideoDataset(str(tsv), ids, num_frames=6, size=32, max_bad_fraction=0.2)
    samples = [tolerant[i] for i in range(len(tolerant))]
    assert samples[2]["video_id"] == ids[3] and samples[2]["index"] == 3  # the next sample stands in
    report = tolerant.bad_sample_report()
    assert report["bad"] == 1 and report["bad_videos"][0][0] == ids[2]
    many_bad = _tsv_with_bad_rows(demo, tmp_path / "worse.tsv", set(range(0, 40, 2)))
    limited = VideoDataset(str(many_bad), None, num_frames=6, size=32, max_bad_fraction=0.2)
    with pytest.raises(BadSampleLimitError, match="max_bad_fraction=0.2"):
        for i in range(len(limited)):
            limited[i]


def test_collate_rejects_mismatched_samples():
    with pytest.raises(ValueError, match="keys"):
        collate([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])
    batch = collate([{"x": 1, "y": 0.5, "z": "s", "w": True}, {"x": 2, "y": 1.5, "z": "t", "w": False}])
    assert batch["x"].dtype == torch.long and batch["y"].dtype == torch.float32 and batch["z"] == ["s", "t"]
    assert batch["w"].dtype == torch.bool


def test_tokenizer_special_ids_come_from_the_vocab(demo_tokenizer, bert_dir):
    bert = Tokenizer(bert_dir)
    for tok in (demo_tokenizer, bert):
        vocab = tok.hf.get_vocab()
        assert tok.cls_id == vocab["[CLS]"] and tok.sep_id == vocab["[SEP]"] and tok.pad_id == vocab["[PAD]"]
        assert tok.mask_id == vocab["[MASK]"] and set(tok.special_ids) >= {tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id}
        ids, mask = tok.encode(["a red circle moves left", "up"], 10)
        assert ids.shape == mask.shape == (2, 10) and ids.dtype == mask.dtype == torch.long
        assert ids[1, mask[1].sum() - 1] == tok.sep_id and ids[1, -1] == tok.pad_id
    assert demo_tokenizer.cls_id != bert.cls_id  # nothing hard-coded: the two vocabularies differ
    with pytest.raises(FileNotFoundError, match="not a tokenizer directory"):
        Tokenizer(Path(bert_dir).parent / "nowhere")


def _mc_file(path: Path, video: str, options: list[str]) -> Path:
    record = {"question": "what does the small red square do ?", "video": video, "answer": 0,
              **{f"option_{k}": o for k, o in enumerate(options)}}
    path.write_text(json.dumps({"train": [record]}))
    return path


def test_text_cut_at_max_text_len_is_reported(demo, demo_tokenizer, tmp_path, caplog):
    tsv, video = str(demo / "video_*.tsv"), TSVFile(next(demo.glob("video_*.tsv")))[0][0]
    same_start = ["it moves left and then it moves up", "it moves left and then it moves down", "it moves right",
                  "it stays still", "it moves up"]
    annotations = _mc_file(tmp_path / "mc.json", video, same_start)
    caplog.set_level("WARNING", logger="violet_ds.data.datasets")
    MCQADataset(tsv, annotations, "train", demo_tokenizer, num_frames=2, size=32, max_text_len=64)
    assert not caplog.records
    MCQADataset(tsv, annotations, "train", demo_tokenizer, num_frames=2, size=32, max_text_len=14)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert str(annotations) in messages[0] and "longer than data.max_text_len=14" in messages[0]
    # the two options that differ only in their last word are equal once cut: nothing can answer that record
    assert "1 of 1 records" in messages[1] and same_start[0] in messages[1] and same_start[1] in messages[1]
    caplog.clear()
    PretrainDataset(tsv, demo / "txt_pretrain.json", "train", demo_tokenizer, num_frames=2, size=32, max_text_len=5)
    assert len(caplog.records) == 1 and "longer than data.max_text_len=5" in caplog.records[0].getMessage()


def test_shuffled_frame_order_ablation(demo, demo_tokenizer):
    tsv = str(demo / "video_*.tsv")
    common = dict(num_frames=6, size=32, max_text_len=16, train=False)
    kept = MCQADataset(tsv, demo / "txt_qamc.json", "train", demo_tokenizer, **common)
    shuffled = MCQADataset(tsv, demo / "txt_qamc.json", "train", demo_tokenizer, frame_order="shuffle", **common)
    for index in range(4):
        frames = kept.source.frames(kept.records[index].video)
        order_a, order_b = (shuffled.reader(frames)[1], shuffled.reader(frames)[1])
        kept_order = kept.reader(frames)[1]
        # the same frames, never in their own order, and the same order at every evaluation
        assert sorted(order_a.tolist()) == kept_order.tolist() and not order_a.equal(kept_order)
        assert order_a.equal(order_b)
        assert shuffled[index]["video"].equal(kept[index]["video"][torch.argsort(torch.argsort(order_a))])
    training = MCQADataset(tsv, demo / "txt_qamc.json", "train", demo_tokenizer, frame_order="shuffle",
                           **{**common, "train": True})
    frames = kept.source.frames(kept.records[0].video)
    assert len({tuple(training.reader(frames)[1].argsort().tolist()) for _ in range(8)}) > 1
    with pytest.raises(ValueError, match="frame_order"):
        MCQADataset(tsv, demo / "txt_qamc.json", "train", demo_tokenizer, frame_order="reverse", **common)
