"""Multi-task finetuning: step-seeded task choice, shared MLM head, test videos out of every training set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from violet_ds.config import DataConfig, DataSource, TaskConfig

def leaky_retrieval(demo: Path) -> Path:
    """The demo retrieval annotation with 3 test-split records copied into its training split."""
    import json

    path = demo / "txt_retrieval_leaky.json"
    if not path.is_file():
        data = json.loads((demo / "txt_retrieval.json").read_text())
        data["train"] = data["train"] + data["test"][:3]
        path.write_text(json.dumps(data))
    return path


def setup(demo: Path, head_style: str = "mlm", seed: int = 0):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    def sources(split):
        return [DataSource(tsv=str(demo / "video_*.tsv"), annotations=str(demo / name), split=split)
                for name in ("txt_qaoe.json", "txt_retrieval.json", "txt_action.json")]

    # retrieval trains on a file whose training split leaks test videos: the filter must remove them
    data = DataConfig(train=sources("train") + [DataSource(tsv=str(demo / "video_*.tsv"),
                                                             annotations=str(leaky_retrieval(demo)),
                                                             split="train")],
                      val=sources("val"), test=sources("test"), tokenizer=str(demo / "tokenizer"), num_frames=2,
                      image_size=64, max_text_len=16, batch_size=4, num_workers=0)
    options = {"seed": seed, "tasks": [
        {"task": "qa_oe", "key": "qa", "train": [0], "val": [0], "test": [0],
         "options": {"answer_vocab": str(demo / "txt_qaoe.json")}},
        {"task": "retrieval", "key": "ret", "train": [3], "val": [1], "test": [1], "weight": 2.0},
        {"task": "action_cls", "key": "act", "train": [2], "val": [2], "test": [2],
         "options": {"labels": str(demo / "txt_action.json")}},
    ]}
    torch.manual_seed(0)
    tokenizer = Tokenizer(demo / "tokenizer")
    task = create_task("multitask", create_model("violet-tiny", vocab_size=384, max_frames=4),
                       TaskConfig(name="multitask", head_style=head_style, options=options), tokenizer)
    return task, data, tokenizer


def test_task_of_step_is_a_function_of_seed_and_step(demo):
    task, _, _ = setup(demo)
    again, _, _ = setup(demo)
    sequence = [task.task_of_step(s) for s in range(200)]
    assert sequence == [again.task_of_step(s) for s in range(200)]  # what every rank computes
    counts = {key: sequence.count(key) for key in ("qa", "ret", "act")}
    assert all(counts.values())
    assert counts["ret"] > counts["qa"] and counts["ret"] > counts["act"]  # weight 2 vs 1
    other, _, _ = setup(demo, seed=1)
    assert [other.task_of_step(s) for s in range(200)] != sequence


def test_mlm_head_is_shared_and_state_dict_names(demo):
    task, _, _ = setup(demo, "mlm")
    assert task.subtasks["qa"].heads["mlm"] is task.heads["mlm"] is task.subtasks["act"].heads["mlm"]
    keys = set(task.state_dict())
    assert any(k.startswith("heads.mlm.") for k in keys)
    assert not any(".subtasks." in k for k in keys)
    assert "steps_done" in keys  # the task sequence survives a resume
    head_task, _, _ = setup(demo, "head")
    assert {"qa_answer", "ret_score", "act_classifier"} <= set(head_task.heads.keys())


def test_test_videos_are_filtered_and_one_task_per_step(demo):
    from violet_ds.data import annotations as ann
    from violet_ds.data.datasets import collate

    task, data, tokenizer = setup(demo, "head")
    test_videos = set()
    for name in ("txt_qaoe.json", "txt_retrieval.json", "txt_action.json"):
        kind, loaded = ann.load_any(demo / name, "test")
        test_videos |= {r.video for r in (loaded.records if hasattr(loaded, "records") else loaded)}
    leaked = ann.load_text_video(leaky_retrieval(demo), "train")
    assert sum(r.video in test_videos for r in leaked) == 3
    built = task.build_datasets(data, tokenizer, "train")["train"]
    assert not any(r.video in test_videos for ds in built.datasets.values() for r in ds.records)
    assert len(built.datasets["ret"]) == len(leaked) - 3
    assert len(built) == max(len(ds) for ds in built.datasets.values())
    batch = collate([built[i] for i in range(4)])
    assert {"qa/video", "ret/text_ids", "act/label", "index"} <= set(batch)
    task.train()
    chosen = task.task_of_step(0)
    out = task(batch)
    assert int(task.steps_done) == 1
    assert any(key.startswith(f"{chosen}/") for key in out)
    out["loss"].backward()
    # every head gets a gradient (zero for the heads of other tasks): same graph on every rank
    assert all(p.grad is not None for p in task.heads.parameters())
    used = {id(p) for p in task.subtasks[chosen].heads.parameters()}
    assert all(float(p.grad.abs().sum()) == 0.0 for p in task.heads.parameters() if id(p) not in used)


def test_evaluation_prefixes_every_task(demo):
    from torch.utils.data import DataLoader, Subset

    from violet_ds.data.datasets import collate
    from violet_ds.engine.distributed import World
    from violet_ds.engine.evaluator import evaluate

    task, data, tokenizer = setup(demo, "mlm")
    datasets = task.build_datasets(data, tokenizer, "val")
    assert set(datasets) == {"qa/val", "ret/texts", "ret/videos", "act/val"}
    loaders = {name: DataLoader(ds if name.startswith("ret/") else Subset(ds, range(4)), batch_size=4,
                                collate_fn=collate) for name, ds in datasets.items()}
    metrics = evaluate(task, loaders, World())
    assert {"qa/acc", "ret/t2v_R@1", "act/acc", "mean_main"} <= set(metrics)
    assert metrics["mean_main"] == pytest.approx((metrics["qa/acc"] + metrics["ret/t2v_R@1"] + metrics["act/acc"]) / 3)
