"""The official sample annotations load into their tasks and run one training step on real frames.

The fixture TSV (`_tools/msrvtt.tsv`) holds 10 MSR-VTT videos (video7010 .. video7019), while the
annotation files name other videos (MSR-VTT, MSVD, TGIF ids). Each distinct video id of an annotation
file is mapped, in order of first appearance, onto one of those 10 rows (id k -> row k mod 10), the
annotation is rewritten with the mapped ids into tmp_path, and everything else (questions, options,
answers, vocabulary, captions) is the official content. Text uses the real BERT-uncased vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from violet_ds.config import DataConfig, DataSource, TaskConfig


def fixture_rows(official_dir: Path) -> list[str]:
    from violet_ds.data.tsv import TSVFile

    return list(TSVFile(official_dir / "_tools" / "msrvtt.tsv").keys())


def remap_annotation(source: Path, rows: list[str], out: Path) -> dict:
    """Copy of an official annotation file with its video ids mapped onto the fixture rows."""
    data = json.loads(source.read_text())
    mapping: dict[str, str] = {}
    for split in ("train", "val", "test"):
        for record in data.get(split, []):
            video = str(record["video"])
            record["video"] = mapping.setdefault(video, rows[len(mapping) % len(rows)])
    out.write_text(json.dumps(data))
    return data


def one_step(task_name: str, head_style: str, annotation: Path, tsv: Path, bert_dir: Path, options=None,
             **task_fields):
    from violet_ds.data.datasets import collate
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    tokenizer = Tokenizer(bert_dir)
    model = create_model("violet-tiny", vocab_size=tokenizer.vocab_size, max_frames=2)
    cfg = TaskConfig(name=task_name, head_style=head_style, options=dict(options or {}), **task_fields)
    task = create_task(task_name, model, cfg, tokenizer)
    data = DataConfig(train=[DataSource(tsv=str(tsv), annotations=str(annotation), split="train")],
                      val=[DataSource(tsv=str(tsv), annotations=str(annotation), split="val")],
                      tokenizer=str(bert_dir), num_frames=2, image_size=64, max_text_len=25, batch_size=2,
                      num_workers=0)
    train_set = next(iter(task.build_datasets(data, tokenizer, "train").values()))
    assert len(train_set) == 200  # every official training record is kept
    batch = collate([train_set[i] for i in range(3)])
    assert batch["video"].shape == (3, 2, 3, 64, 64) and batch["video"].dtype == torch.uint8
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    before = {name: p.detach().clone() for name, p in task.named_parameters()}
    task.train()
    out = task(batch)
    assert torch.isfinite(out["loss"]) and float(out["loss"].detach()) > 0
    out["loss"].backward()
    optimizer.step()
    changed = [name for name, p in task.named_parameters() if not torch.equal(before[name], p.detach())]
    assert any(name.startswith("heads.") for name in changed)
    assert any(name.startswith("model.video_backbone.") for name in changed)
    return task, data, tokenizer


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_msrvtt_retrieval_fixture(official_dir, bert_dir, tmp_path, head_style):
    from violet_ds.engine.distributed import World
    from violet_ds.commands.run import eval_loaders

    rows = fixture_rows(official_dir)
    annotation = tmp_path / "txt_msrvtt-retrieval.json"
    remap_annotation(official_dir / "_data" / "txt_msrvtt-retrieval.json", rows, annotation)
    tsv = official_dir / "_tools" / "msrvtt.tsv"
    task, data, tokenizer = one_step("retrieval", head_style, annotation, tsv, bert_dir, {"pair_batch": 128})
    # evaluation over the mapped val split: 50 captions x the distinct mapped videos
    data.eval_batch_size = 8
    datasets = task.build_datasets(data, tokenizer, "val")
    assert set(datasets) == {"texts", "videos"}
    metrics = task.evaluate_full(eval_loaders(datasets, data, World(), 0), World())
    assert metrics["num_texts"] == 50 and metrics["num_videos"] == len(datasets["videos"])
    assert 1.0 <= metrics["t2v_median_rank"] <= metrics["num_videos"]


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_msvd_qa_fixture(official_dir, bert_dir, tmp_path, head_style):
    rows = fixture_rows(official_dir)
    annotation = tmp_path / "txt_msvd-qa.json"
    data = remap_annotation(official_dir / "_data" / "txt_msvd-qa.json", rows, annotation)
    task, _, _ = one_step("qa_oe", head_style, annotation, official_dir / "_tools" / "msrvtt.tsv", bert_dir,
                          {"answer_vocab": str(annotation)})
    assert task.num_answers == len(data["vocab"]) == 1000
    if head_style == "mlm":
        # answers that are one word piece of BERT-uncased are answerable at [MASK]
        assert 0.5 < task.single_piece_fraction <= 1.0


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_tgif_action_fixture(official_dir, bert_dir, tmp_path, head_style):
    rows = fixture_rows(official_dir)
    annotation = tmp_path / "txt_tgif-action.json"
    remap_annotation(official_dir / "_data" / "txt_tgif-action.json", rows, annotation)
    one_step("qa_mc", head_style, annotation, official_dir / "_tools" / "msrvtt.tsv", bert_dir, num_options=5)
