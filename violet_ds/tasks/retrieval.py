"""Text-to-video retrieval with a cross-encoder (MSRVTT, DiDeMo, LSMDC, MSVD).

Training: in-batch contrast over cross-encoder scores. Every video of the batch is paired with its
own caption and with the other captions of the batch (all of them, or `negatives` sampled ones); a
caption of the same video elsewhere in the batch is not a negative (masked out).
- head_style "head": `heads.score` on the pooled output, logits / temperature, cross-entropy towards
  the own caption (video->text, plus text->video when the full in-batch matrix is scored; the two terms
  are summed as in the official code, `task.options.symmetric_reduction: mean` averages them);
- head_style "mlm": LAVENDER's true/false at [MASK] (MLM cross-entropy over the vocabulary towards
  "true" for the own caption, "false" otherwise); the score is the log-odds of the softmax over
  {true, false}.

Evaluation (`evaluate_full`): the full text x video score matrix. Videos are sharded across ranks and
encoded once (multi-clip: encoder outputs averaged over clips); every rank holds all captions (only
their embeddings, which are cheap) and scores its own videos against all of them in chunks, running
only the cross-modal transformer per pair; the score columns are gathered and every rank computes
R@1/5/10 and median rank (text->video and video->text, several captions per video allowed).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from violet_ds.data.datasets import RetrievalDataset, build_retrieval_eval
from violet_ds.metrics import retrieval_metrics
from violet_ds.progress import progress
from violet_ds.registry import TASKS
from violet_ds.tasks.common import (DownstreamTask, chunks, encode_video, gather_objects, gather_step_outputs,
                                    repeat_rows)


@TASKS.register("retrieval")
class Retrieval(DownstreamTask):
    """Cross-encoder text-to-video retrieval."""

    task_token_name = "vtm"

    option_defaults: Dict[str, Any] = {
        "negatives": -1,           # captions paired with each video besides its own; -1 = every other one in the batch
        "symmetric": True,         # head style with the full in-batch matrix: video->text and text->video terms
        # how the two terms combine: "sum" (the official VIOLET/LAVENDER code) or "mean" (half the gradient,
        # which matters only where clipping or plain SGD sees the scale; AdamW normalises it away otherwise)
        "symmetric_reduction": "sum",
        "temperature": None,       # None = task.vtm_temperature (0.05, as in pretraining VTM)
        "pair_batch": 256,         # text-video pairs per cross-modal forward at evaluation
        "ties": "pessimistic",     # tie rule of the ranks (see violet_ds.metrics.ranks_of_targets)
        "max_eval_texts": 0,       # >0: evaluate on the first N captions only (quick checks)
    }

    dataset_class = RetrievalDataset

    def build(self) -> None:
        super().build()
        self._add_match_head()
        temperature = self.options["temperature"]
        self.temperature = float(self.cfg.vtm_temperature if temperature is None else temperature)
        if self.options["symmetric_reduction"] not in ("sum", "mean"):
            raise ValueError(f"retrieval: task.options.symmetric_reduction must be 'sum' or 'mean', "
                             f"got {self.options['symmetric_reduction']!r}")
        self.last_scores: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------------------ training
    def _candidate_texts(self, batch_size: int, video_ids: List[str], device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Text index per (video, candidate) `(B, K)` with the own text first, and a validity mask.

        A candidate caption that describes the same video (another caption of it in the batch) is
        invalid: it is neither a negative nor a second positive.
        """
        same_video = torch.tensor([[a == b for b in video_ids] for a in video_ids], dtype=torch.bool, device=device) \
            if video_ids else torch.eye(batch_size, dtype=torch.bool, device=device)
        negatives = self.options["negatives"]
        others = batch_size - 1
        if negatives < 0 or negatives >= others:
            # every text, own text rotated to position 0
            order = (torch.arange(batch_size, device=device)[None, :] + torch.arange(batch_size, device=device)[:, None]) % batch_size
        else:
            noise = torch.rand(batch_size, batch_size, device=device)
            noise.fill_diagonal_(-1.0)  # own text first after the sort
            order = noise.argsort(dim=1)[:, : negatives + 1]
        valid = ~same_video.gather(1, order)
        valid[:, 0] = True
        return order, valid

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        video_tokens, video_mask = encode_video(self.model, batch["video"])
        device = video_tokens.device
        text_ids, text_mask = batch["text_ids"].to(device), batch["text_mask"].to(device)
        batch_size = text_ids.shape[0]
        order, valid = self._candidate_texts(batch_size, list(batch.get("video_id", [])), device)
        num_candidates = order.shape[1]
        pair_video = repeat_rows(video_tokens, num_candidates)
        pair_video_mask = repeat_rows(video_mask, num_candidates)
        pair_ids, pair_mask = text_ids[order.flatten()], text_mask[order.flatten()]
        if self.head_style == "mlm":
            is_match = torch.zeros_like(order)
            is_match[:, 0] = 1
            keep = valid.flatten()
            loss, scores = self.match_mlm_loss(pair_video[keep], pair_video_mask[keep], pair_ids[keep], pair_mask[keep],
                                               is_match.flatten()[keep])
            logits = torch.full(order.shape, float("-inf"), device=device)
            logits.view(-1)[keep] = scores.detach()
        else:
            scores = self.match_scores(pair_video, pair_video_mask, pair_ids, pair_mask).view(batch_size, num_candidates)
            logits = scores.masked_fill(~valid, float("-inf")) / self.temperature
            target = torch.zeros(batch_size, dtype=torch.long, device=device)
            loss = F.cross_entropy(logits, target)
            if self.options["symmetric"] and num_candidates == batch_size:
                # undo the rotation: matrix[v, t] = logits[v, (t - v) mod B]
                column = (torch.arange(batch_size, device=device)[None, :] - torch.arange(batch_size, device=device)[:, None]) % batch_size
                matrix = logits.gather(1, column)
                loss = loss + F.cross_entropy(matrix.t(), torch.arange(batch_size, device=device))
                if self.options["symmetric_reduction"] == "mean":
                    loss = 0.5 * loss
        acc = (logits.argmax(dim=1) == 0).float().mean()
        return {"loss": loss, "in_batch_acc": acc.detach()}

    # ---------------------------------------------------------------------------- evaluation
    def build_datasets(self, data_cfg, tokenizer, split: str) -> Dict[str, Any]:
        """Evaluation splits as two datasets, `texts` (every caption) and `videos` (every video once,
        `data.eval_clips` clips each) for `evaluate_full`; training uses the generic pair dataset."""
        if split == "train":
            return super().build_datasets(data_cfg, tokenizer, split)
        return build_retrieval_eval_datasets(data_cfg, tokenizer, split)

    @torch.no_grad()
    def _encode_video_shard(self, loader, world, max_batches: Optional[int] = None
                            ) -> Tuple[List[int], List[str], List[torch.Tensor]]:
        """Encode this rank's share of the videos once: (indices, video ids, token tensors per batch);
        `max_batches` stops after that many loader batches."""
        rank, world_size = (world.rank, world.world_size) if world is not None else (0, 1)
        indices: List[int] = []
        video_ids: List[str] = []
        tokens: List[torch.Tensor] = []
        seen = set()
        total = len(loader) if hasattr(loader, "__len__") else None
        if total is not None and max_batches is not None:
            total = min(total, max_batches)
        for batch in _progress(itertools.islice(loader, max_batches), "retrieval: videos", world, total):
            index = batch["index"].long().view(-1)
            # keep index % world == rank: with the engine's strided sampler (no shuffle) this is exactly the
            # rank's share without its padding repeats; with an unsharded loader it shards the encoding work
            keep = [i for i, value in enumerate(index.tolist()) if value % world_size == rank and value not in seen]
            if not keep:
                continue
            seen.update(index[keep].tolist())
            encoded, _ = encode_video(self.model, batch["video"][keep])
            indices.extend(index[keep].tolist())
            video_ids.extend(batch["video_id"][i] for i in keep)
            tokens.append(encoded)
        return indices, video_ids, tokens

    @torch.no_grad()
    def _collect_texts(self, loader, world) -> Dict[str, Any]:
        """Every caption on every rank (gathered and deduplicated by index when the loader is sharded)."""
        rows = []
        for batch in loader:
            for i, index in enumerate(batch["index"].tolist()):
                rows.append((int(index), batch["text_ids"][i].cpu(), batch["text_mask"][i].cpu(), batch["video_id"][i]))
        rows = gather_objects(rows, world)
        by_index = {}
        for row in rows:
            by_index.setdefault(row[0], row)
        ordered = [by_index[i] for i in sorted(by_index)]
        limit = self.options["max_eval_texts"]
        if limit > 0:
            ordered = ordered[:limit]
        if not ordered:
            raise ValueError("retrieval: the text loader yielded no captions")
        return {"index": torch.tensor([r[0] for r in ordered]), "text_ids": torch.stack([r[1] for r in ordered]),
                "text_mask": torch.stack([r[2] for r in ordered]), "video_id": [r[3] for r in ordered]}

    @torch.no_grad()
    def score_matrix_shard(self, texts: Dict[str, Any], video_tokens: List[torch.Tensor], world=None) -> torch.Tensor:
        """Scores `(num_texts, num_local_videos)` of every caption against this rank's encoded videos.

        The cached video encoder outputs are reused for every caption: only the cross-modal transformer
        runs per pair, `pair_batch` (video, caption) pairs per forward.
        """
        device = next(self.model.parameters()).device
        text_ids, text_mask = texts["text_ids"].to(device), texts["text_mask"].to(device)
        num_texts = text_ids.shape[0]
        if not video_tokens:
            return torch.empty(num_texts, 0)
        videos = torch.cat(video_tokens, dim=0)
        num_videos = videos.shape[0]
        scores = torch.empty(num_videos * num_texts, dtype=torch.float32)
        pair_batch = max(1, int(self.options["pair_batch"]))
        bounds = list(chunks(num_videos * num_texts, pair_batch))
        for start, stop in _progress(bounds, "retrieval: scoring", world):
            pair = torch.arange(start, stop, device=device)
            video_index, text_index = pair // num_texts, pair % num_texts
            pair_video = videos.index_select(0, video_index)
            pair_mask = torch.ones(pair_video.shape[:2], dtype=torch.long, device=device)
            scores[start:stop] = self.match_scores(pair_video, pair_mask, text_ids[text_index],
                                                   text_mask[text_index]).float().cpu()
        return scores.view(num_videos, num_texts).t().contiguous()

    @torch.no_grad()
    def evaluate_full(self, loaders: Dict[str, Any], world, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Full text x video evaluation; `loaders` has `texts` and `videos` (see `build_datasets`).

        `max_batches` (validation during training: `run.val_max_batches`) encodes only the first
        `max_batches` video batches of each rank and ranks the captions of those videos among them.
        """
        missing = {"texts", "videos"} - set(loaders)
        if missing:
            raise KeyError(f"retrieval.evaluate_full needs loaders 'texts' and 'videos', missing {sorted(missing)} "
                           f"(got {sorted(loaders)})")
        was_training = self.training
        self.eval()
        try:
            texts = self._collect_texts(loaders["texts"], world)
            indices, video_ids, video_tokens = self._encode_video_shard(loaders["videos"], world, max_batches)
            if max_batches is not None:
                texts = _texts_of_videos(texts, {v for part in gather_objects([video_ids], world) for v in part})
            local = self.score_matrix_shard(texts, video_tokens, world)
            shards = gather_objects([(indices, video_ids, local)], world)
        finally:
            self.train(was_training)
        all_indices = [i for part in shards for i in part[0]]
        all_ids = [v for part in shards for v in part[1]]
        matrix = torch.cat([part[2] for part in shards], dim=1)
        order = torch.tensor(all_indices, dtype=torch.long).argsort()
        matrix = matrix[:, order]
        all_ids = [all_ids[i] for i in order.tolist()]
        column_of = {}
        for column, video_id in enumerate(all_ids):
            if video_id in column_of:
                raise ValueError(f"retrieval: video {video_id!r} appears twice in the video list")
            column_of[video_id] = column
        absent = sorted({v for v in texts["video_id"] if v not in column_of})
        if absent:
            raise ValueError(f"retrieval: captions name videos missing from the video list: {absent[:5]}")
        target = torch.tensor([column_of[v] for v in texts["video_id"]])
        self.last_scores = matrix
        top = matrix.topk(min(5, matrix.shape[1]), dim=1).indices.tolist()
        self.last_predictions = [
            {"text_index": int(ti), "video": gt, "top5": [all_ids[j] for j in row_top]}
            for ti, gt, row_top in zip(texts["index"].tolist(), texts["video_id"], top)]
        metrics = retrieval_metrics(matrix, target, ties=self.options["ties"])
        metrics["num_texts"] = float(matrix.shape[0])
        metrics["num_videos"] = float(matrix.shape[1])
        return metrics

    # Step-wise evaluation (used when an engine has no full-matrix hook): in-batch matrix only.
    @torch.no_grad()
    def evaluate_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        out = self.forward(batch)
        size = batch["text_ids"].shape[0]
        return {"index": batch["index"].cpu(), "in_batch_acc": out["in_batch_acc"].cpu().expand(size).clone()}

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        return {"in_batch_acc": 100.0 * float(merged["in_batch_acc"].mean())}


def _texts_of_videos(texts: Dict[str, Any], videos: set) -> Dict[str, Any]:
    """The rows of a `_collect_texts` result whose video is in `videos`."""
    keep = [i for i, video in enumerate(texts["video_id"]) if video in videos]
    if not keep:
        raise ValueError("retrieval: no caption names one of the videos encoded within max_batches")
    rows = torch.tensor(keep, dtype=torch.long)
    return {"index": texts["index"][rows], "text_ids": texts["text_ids"][rows], "text_mask": texts["text_mask"][rows],
            "video_id": [texts["video_id"][i] for i in keep]}


def build_retrieval_eval_datasets(data_cfg, tokenizer, split: str) -> Dict[str, Any]:
    """`texts` and `videos` datasets of the single source in `data.<split>` (columns follow first mention),
    each video as `data.eval_clips` clips."""
    sources = data_cfg.sources(split)
    if len(sources) != 1:
        raise ValueError(f"retrieval: data.{split} needs exactly one source for evaluation, got {len(sources)}")
    source = sources[0]
    return build_retrieval_eval(source.tsv, source.annotations, source.split, tokenizer, data_cfg.num_frames,
                                data_cfg.image_size, data_cfg.max_text_len, clips=data_cfg.eval_clips,
                                decoder=data_cfg.jpeg_decoder, max_bad_fraction=data_cfg.max_bad_fraction,
                                frame_order=data_cfg.frame_order)


def _progress(iterable, description: str, world, total: Optional[int] = None):
    """Progress on the main rank only: a bar on terminals, dated lines elsewhere (log files of batch jobs)."""
    if world is not None and not world.is_main:
        return iterable

    return progress(iterable, total=total, desc=description, unit="batch", leave=False)
