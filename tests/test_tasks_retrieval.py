"""Retrieval task: in-batch training loss, full-matrix evaluation, sharded evaluation (2 gloo processes == 1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from violet_ds.config import TaskConfig
from violet_ds.engine.distributed import free_port

WORDS = ["red", "green", "blue", "circle", "square", "moves", "left", "right", "true", "false", "a", "the"]
NUM_VIDEOS = 7
# 11 captions of 7 videos: some videos have two captions, video 6 has three
CAPTION_VIDEO = [0, 0, 1, 2, 2, 3, 4, 5, 6, 6, 6]


def make_tokenizer_dir(root: Path) -> Path:
    """A tiny BERT-style vocabulary (special tokens + a few words)."""
    folder = root / "tok"
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    return folder


class TextSet(Dataset):
    def __init__(self, tokenizer):
        generator = torch.Generator().manual_seed(3)
        self.items = []
        for index, video in enumerate(CAPTION_VIDEO):
            words = [WORDS[i] for i in torch.randint(0, 8, (5,), generator=generator).tolist()]
            ids, mask = tokenizer.encode([" ".join(words)], 10)
            self.items.append({"text_ids": ids[0], "text_mask": mask[0], "video_id": f"v{video}", "index": index})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


class VideoSet(Dataset):
    def __init__(self):
        generator = torch.Generator().manual_seed(5)
        self.videos = torch.randint(0, 256, (NUM_VIDEOS, 2, 3, 32, 32), generator=generator, dtype=torch.uint8)

    def __len__(self):
        return NUM_VIDEOS

    def __getitem__(self, index):
        return {"video": self.videos[index], "video_id": f"v{index}", "index": index}


def build_task(tokenizer_dir: Path, head_style: str = "head", **options):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    tokenizer = Tokenizer(tokenizer_dir)
    model = create_model("violet-tiny", vocab_size=tokenizer.vocab_size, max_frames=2)
    options.setdefault("pair_batch", 5)  # several chunks per matrix, chunks crossing video boundaries
    task = create_task("retrieval", model, TaskConfig(name="retrieval", head_style=head_style, options=options),
                       tokenizer)
    if "score" in task.heads:
        # score heads start with a zero last layer (all scores equal): give the matrices something to rank
        torch.nn.init.normal_(task.heads["score"][3].weight, std=0.5)
    return task.eval(), tokenizer


def loaders_for(tokenizer, rank: int, world: int):
    from violet_ds.data.datasets import collate
    from violet_ds.data.sampler import ResumableDistributedSampler

    out = {}
    for name, dataset in (("texts", TextSet(tokenizer)), ("videos", VideoSet())):
        sampler = ResumableDistributedSampler(len(dataset), rank, world, 0, shuffle=False, drop_last=False)
        out[name] = DataLoader(dataset, batch_size=3, sampler=sampler, collate_fn=collate)
    return out


def _sharded_worker(rank: int, world: int, port: int, tokenizer_dir: str, out_dir: str):
    import torch.distributed as dist

    from violet_ds.engine.distributed import World

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for head_style in ("head", "mlm"):
            task, tokenizer = build_task(Path(tokenizer_dir), head_style)
            metrics = task.evaluate_full(loaders_for(tokenizer, rank, world), World(rank=rank, world_size=world))
            torch.save({"metrics": metrics, "scores": task.last_scores}, Path(out_dir) / f"{head_style}_rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # both results are on disk: leave without tearing gloo down. Its teardown at interpreter exit aborted a
    # rank under load in CI ("terminate called without an active exception"), even after the barrier
    os._exit(0)


def test_sharded_evaluation_matches_single_process(tmp_path):
    """Both head styles: 2 gloo processes give the same score matrix and metrics as one process."""
    from violet_ds.engine.distributed import World
    from violet_ds.tasks.common import encode_video

    tokenizer_dir = make_tokenizer_dir(tmp_path)
    env_backup = dict(os.environ)
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        mp.spawn(_sharded_worker, args=(2, free_port(), str(tokenizer_dir), str(tmp_path)), nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    for head_style in ("head", "mlm"):
        task, tokenizer = build_task(tokenizer_dir, head_style)
        single = task.evaluate_full(loaders_for(tokenizer, 0, 1), World())
        reference = task.last_scores
        assert reference.shape == (len(CAPTION_VIDEO), NUM_VIDEOS)
        assert single["num_texts"] == len(CAPTION_VIDEO) and single["num_videos"] == NUM_VIDEOS
        # the matrix holds the cross-encoder score of each (caption, video) pair: recompute one alone
        with torch.no_grad():
            texts = TextSet(tokenizer)
            video_tokens, video_mask = encode_video(task.model, VideoSet().videos[3:4])
            one = task.match_scores(video_tokens, video_mask, texts[8]["text_ids"][None], texts[8]["text_mask"][None])
        assert float(one) == pytest.approx(float(reference[8, 3]), abs=1e-5)
        for rank in range(2):
            result = torch.load(tmp_path / f"{head_style}_rank{rank}.pt", weights_only=True)
            torch.testing.assert_close(result["scores"], reference, atol=1e-5, rtol=1e-5)
            assert result["metrics"] == pytest.approx(single)


def test_max_batches_ranks_captions_of_the_encoded_videos_only(tmp_path):
    """`max_batches` (run.val_max_batches) caps the video batches; captions of other videos are left out and
    the scores are the matching block of the full matrix."""
    from violet_ds.engine.distributed import World
    from violet_ds.engine.evaluator import evaluate

    tokenizer_dir = make_tokenizer_dir(tmp_path)
    task, tokenizer = build_task(tokenizer_dir, "head")
    task.evaluate_full(loaders_for(tokenizer, 0, 1), World())
    full = task.last_scores
    metrics = evaluate(task, loaders_for(tokenizer, 0, 1), World(), max_batches=1)  # 1 batch = videos 0..2
    kept = [row for row, video in enumerate(CAPTION_VIDEO) if video < 3]
    assert metrics["num_videos"] == 3 and metrics["num_texts"] == len(kept)
    torch.testing.assert_close(task.last_scores, full[kept][:, :3], atol=1e-5, rtol=1e-5)


def test_training_loss_in_batch_contrast(tmp_path):
    tokenizer_dir = make_tokenizer_dir(tmp_path)
    task, tokenizer = build_task(tokenizer_dir, "head")
    task.train()
    texts, videos = TextSet(tokenizer), VideoSet()
    # captions 0 and 1 describe the same video: neither may be the other's negative
    picks = [0, 1, 2, 3]
    batch = {"video": videos.videos[[CAPTION_VIDEO[i] for i in picks]],
             "text_ids": torch.stack([texts[i]["text_ids"] for i in picks]),
             "text_mask": torch.stack([texts[i]["text_mask"] for i in picks]),
             "video_id": [f"v{CAPTION_VIDEO[i]}" for i in picks]}
    order, valid = task._candidate_texts(4, batch["video_id"], torch.device("cpu"))
    assert order[:, 0].tolist() == [0, 1, 2, 3]
    # row 0 (caption 0 / video 0): caption 1 is the same video -> invalid; rows 2, 3 see all others
    assert valid[0].tolist() == [True, False, True, True]
    assert valid[2].all() and valid[3].all()
    out = task(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    assert task.heads["score"][3].weight.grad.abs().sum() > 0  # the last layer starts at zero

    lavender, _ = build_task(tokenizer_dir, "mlm")
    lavender.train()
    out = lavender(batch)
    out["loss"].backward()
    assert lavender.heads["mlm"].bias.grad.abs().sum() > 0


def test_symmetric_terms_are_summed_as_in_the_official_code(tmp_path):
    tokenizer_dir = make_tokenizer_dir(tmp_path)
    texts_task, tokenizer = build_task(tokenizer_dir, "head")
    texts, videos = TextSet(tokenizer), VideoSet()
    picks = [2, 3, 5, 6]  # four different videos: the full in-batch matrix, both directions
    batch = {"video": videos.videos[[CAPTION_VIDEO[i] for i in picks]],
             "text_ids": torch.stack([texts[i]["text_ids"] for i in picks]),
             "text_mask": torch.stack([texts[i]["text_mask"] for i in picks]),
             "video_id": [f"v{CAPTION_VIDEO[i]}" for i in picks]}
    losses = {}
    for reduction in ("sum", "mean"):
        torch.manual_seed(0)
        task, _ = build_task(tokenizer_dir, "head", symmetric_reduction=reduction)
        torch.nn.init.normal_(task.heads["score"][3].weight, std=0.5)  # scores that differ by pair
        task.eval()
        losses[reduction] = task(batch)["loss"]
    assert texts_task.options["symmetric_reduction"] == "sum"
    assert torch.allclose(losses["sum"], 2 * losses["mean"])
    with pytest.raises(ValueError, match="symmetric_reduction"):
        build_task(tokenizer_dir, "head", symmetric_reduction="max")


def test_multi_clip_dataset_offsets_and_averaging(tmp_path):
    """Multi-clip testing: evenly offset clips, encoder outputs averaged over clips."""
    from violet_ds.tasks.common import encode_video
    from violet_ds.data.datasets import MultiClipVideoDataset

    dataset = MultiClipVideoDataset.__new__(MultiClipVideoDataset)
    dataset.num_frames, dataset.eval_clips = 2, 2
    # 8 stored frames, 2 segments of 4: clip 0 at fraction 0.25 -> frames 1, 5; clip 1 at 0.75 -> 3, 7
    assert dataset.clip_indices(8).tolist() == [[1, 5], [3, 7]]
    task, _ = build_task(make_tokenizer_dir(tmp_path))
    videos = VideoSet().videos
    clips = torch.stack([videos[:2], videos[2:4]], dim=1)  # (B=2, clips=2, T, 3, H, W)
    with torch.no_grad():
        averaged, _ = encode_video(task.model, clips)
        first, _ = encode_video(task.model, videos[:2])
        second, _ = encode_video(task.model, videos[2:4])
    torch.testing.assert_close(averaged, (first + second) / 2, atol=1e-5, rtol=1e-5)
