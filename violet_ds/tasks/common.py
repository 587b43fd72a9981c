"""What the VIOLET-family tasks share: option validation, video/text plumbing, [MASK] answers, and the
base classes `VideoTextTask` (pretraining and downstream: head builders, pair matching) and
`DownstreamTask` (the finetuning tasks).

Downstream tasks come in two head styles (`TaskConfig.head_style`):
- "head": VIOLET / VIOLETv2 task heads on the pooled text-[CLS] output (`heads.score` with one
  output for matching / multiple choice / retrieval, `heads.answer` over the answer vocabulary);
- "mlm": LAVENDER's unified interface: a [MASK] is placed after the text and the answer is read
  from the MLM head there (an answer word, or "true"/"false" for matching-style tasks).

Every helper works on whole batches with tensor operations; nothing loops over tokens or frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from violet_ds.data.frames import normalize
from violet_ds.engine.distributed import World
from violet_ds.engine.evaluator import gather_outputs
from violet_ds.masking.text import IGNORE_INDEX
from violet_ds.models.heads import MLMHead, ScoreHead, TaskEmbedding, head_dropout
from violet_ds.tasks.base import Task


def parse_options(task_name: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> Dict[str, Any]:
    """`defaults` updated by `options`; an unknown key is an error that names it and the known ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"task {task_name!r}: unknown task.options key(s) {unknown}; "
                         f"known: {sorted(defaults)}")
    merged = dict(defaults)
    merged.update(options)
    return merged


def word_id(tokenizer, word: str, purpose: str) -> int:
    """Vocabulary id of a word that must be one word piece (e.g. "true" / "false" answers)."""
    token = tokenizer.token_id(word)
    if token < 0:
        raise ValueError(f"{purpose}: the word {word!r} is not a single word piece of tokenizer "
                         f"{tokenizer.path}")
    return token


# ---------------------------------------------------------------------------------------- video
def encode_video(model: nn.Module, video: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (or float) video -> (video_tokens `(B, Nv, D)`, video_mask long `(B, Nv)`).

    `video` is `(B, T, 3, H, W)`, or `(B, C, T, 3, H, W)` for multi-clip testing: the C clips are
    encoded separately and their encoder outputs averaged (one forward through the cross-modal part
    afterwards, as in the official multi-clip evaluation).
    """
    param = next(model.parameters())
    video = video.to(param.device, non_blocking=True)
    clips = 1
    if video.dim() == 6:
        batch, clips = video.shape[:2]
        video = video.flatten(0, 1)
    elif video.dim() != 5:
        raise ValueError(f"video must be (B,T,3,H,W) or (B,clips,T,3,H,W), got {tuple(video.shape)}")
    tokens = model.encode_video(normalize(video, dtype=param.dtype))
    if clips > 1:
        tokens = tokens.view(batch, clips, *tokens.shape[1:]).mean(dim=1)
    mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return tokens, mask


def fuse_pairs(model: nn.Module, video_tokens: torch.Tensor, video_mask: torch.Tensor,
               text_ids: torch.Tensor, text_mask: torch.Tensor,
               task_vector: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-modal hidden states `(B, Nv+L, D)` of already-encoded videos with texts (row-aligned).

    With `task_vector` (a row of LAVENDER's task embedding) the sequence is `[video] [task] [text]`, as
    in LAVENDER's `enable_task_token`: the text keeps its own position ids, the token is attended
    like a text token, and its output row is dropped so that text positions keep their indices.
    """
    text_embeds = model.embed_text(text_ids)
    if task_vector is None:
        return model.fuse(video_tokens, video_mask, text_embeds, text_mask)
    rows = text_embeds.shape[0]
    token = task_vector.to(text_embeds.dtype).view(1, 1, -1).expand(rows, 1, -1)
    hidden = model.fuse(video_tokens, video_mask, torch.cat([token, text_embeds], dim=1),
                        torch.cat([text_mask.new_ones(rows, 1), text_mask], dim=1))
    num_video = video_tokens.shape[1]
    return torch.cat([hidden[:, :num_video], hidden[:, num_video + 1:]], dim=1)


# LAVENDER's task-token rows (official `task_tok2id`) in its 10-row `emb_task` table
TASK_TOKEN_ROWS = {"vtm": 0, "mc": 1, "oe": 2, "cap": 3}
TASK_TOKEN_TABLE = 10


def task_embedding_head(model: nn.Module, trainable: bool) -> nn.Module:
    """LAVENDER's task-token table (`heads.task_embedding`, official `emb_task`).

    MLM-style tasks always own it, so LAVENDER checkpoints load it; it is trained (and used) only with
    `task.task_token`, otherwise frozen (like `video_order`, kept for checkpoint compatibility). Its
    random init runs on a forked RNG so that adding it leaves every other initial weight unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        head = TaskEmbedding(TASK_TOKEN_TABLE, model.hidden_size)
    head.weight.requires_grad_(bool(trainable))
    return head


def pooled_of(hidden: torch.Tensor, num_video_tokens: int) -> torch.Tensor:
    """The text [CLS] output (index Nv: video tokens come first)."""
    return hidden[:, num_video_tokens]


def repeat_rows(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """`(B, ...)` -> `(B*times, ...)` with each row repeated `times` times consecutively."""
    return tensor.repeat_interleave(times, dim=0)


# ----------------------------------------------------------------------------------- text / [MASK]
@dataclass
class SpecialIds:
    cls: int
    sep: int
    pad: int
    mask: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialIds":
        return cls(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id)


def append_answer_mask(text_ids: torch.Tensor, text_mask: torch.Tensor, special: SpecialIds
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[CLS] text [SEP] [PAD]*` -> `[CLS] text [SEP] [MASK] [SEP] [PAD]*` (LAVENDER answer slot).

    When the row is full, the end of the text is cut to make room, so the [MASK] is always present.
    Returns (ids, mask, mask_position `(B,)`). Works on `(..., L)` inputs.
    """
    shape = text_ids.shape
    ids = text_ids.reshape(-1, shape[-1]).clone()
    mask = text_mask.reshape(-1, shape[-1])
    max_len = ids.shape[1]
    if max_len < 4:
        raise ValueError(f"max_text_len {max_len} leaves no room for `[CLS] x [SEP] [MASK] [SEP]`")
    lengths = mask.sum(dim=1).clamp(min=2)
    new_len = (lengths + 2).clamp(max=max_len)
    rows = torch.arange(ids.shape[0], device=ids.device)
    ids[rows, new_len - 3] = special.sep
    ids[rows, new_len - 2] = special.mask
    ids[rows, new_len - 1] = special.sep
    positions = torch.arange(max_len, device=ids.device)[None, :]
    new_mask = (positions < new_len[:, None]).long()
    ids = torch.where(new_mask.bool(), ids, torch.full_like(ids, special.pad))
    return ids.view(shape), new_mask.view(shape), (new_len - 2).view(shape[:-1])


def first_mask_position(text_ids: torch.Tensor, text_mask: torch.Tensor, mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(position of the first [MASK] in each row, whether the row has one) — fill-in-the-blank
    datasets put the [MASK] at the blank already."""
    is_mask = (text_ids == mask_id) & text_mask.bool()
    return is_mask.long().argmax(dim=1), is_mask.any(dim=1)


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden `(B, N, D)`, positions `(B,)` -> `(B, D)`."""
    index = positions.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index).squeeze(1)


def true_false_logits(mlm_logits: torch.Tensor, true_id: int, false_id: int) -> torch.Tensor:
    """Matching score from MLM logits at [MASK]: log p(true) - log p(false) under the two-way softmax.

    This is the log-odds of the proper softmax over {true, false} (monotone in p(true)), which keeps
    full resolution for ranking where p(true) itself would saturate at 1.0 in low precision.
    """
    return mlm_logits[..., true_id].float() - mlm_logits[..., false_id].float()


# ---------------------------------------------------------------------------------- evaluation I/O
def gather_objects(items: List[Any], world) -> List[Any]:
    """Concatenate per-rank lists on every rank (identity when not distributed)."""
    if world is None or not world.distributed:
        return list(items)

    out: List[Optional[List[Any]]] = [None] * world.world_size
    dist.all_gather_object(out, list(items))
    return [item for part in out for item in (part or [])]


def gather_step_outputs(outputs: Sequence[Mapping[str, Any]], world) -> Dict[str, Any]:
    """Merge per-step outputs across ranks, deduplicated by `index` (the engine's gathering)."""
    return gather_outputs(outputs, world if world is not None else World())


def cross_entropy_or_zero(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy `(N, C)` logits vs `(N,)` targets, averaged over the targets that are not IGNORE_INDEX; an
    all-ignored batch gives a zero that keeps the graph. No host sync: the mean is a sum over a clamped count,
    not a branch on `any()` (each such branch stalls the CPU until the GPU catches up)."""
    per_target = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return per_target.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def chance_loss(num_candidates: int, true_false: bool = False) -> float:
    """Loss of a collapsed scorer that gives all `num_candidates` candidates (one correct) the same score.

    Softmax over the candidates: ln K. True/false at [MASK] (LAVENDER): the best constant answer says
    "true" with probability 1/K, so the loss is the binary entropy of 1/K (0.500 for K = 5).
    """
    k = max(int(num_candidates), 1)
    if k == 1:
        return 0.0
    if not true_false:
        return math.log(k)
    p = 1.0 / k
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def chunks(total: int, size: int) -> Iterable[Tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


# ------------------------------------------------------------------------------------ base classes
class VideoTextTask(Task):
    """A task over a VIOLET-family backbone (video + text): head style, special ids, LAVENDER's task token,
    the MLM / score head builders and pair matching (score head on the pooled output, or "true" /
    "false" at an appended [MASK]), shared by pretraining and the downstream tasks."""

    head_styles: Tuple[str, ...] = ("head", "mlm")
    # LAVENDER's task-token row this task uses (`TASK_TOKEN_ROWS`), None for no token
    task_token_name: Optional[str] = None

    def build(self) -> None:
        cfg = self.cfg
        if cfg.head_style not in self.head_styles:
            raise ValueError(f"task {cfg.name!r} supports head_style {list(self.head_styles)}, "
                             f"not {cfg.head_style!r}")
        self.head_style = cfg.head_style
        self.special = SpecialIds.of(self.tokenizer)
        self.task_token = bool(cfg.task_token)
        if self.task_token and self.head_style != "mlm":
            raise ValueError(f"task {cfg.name!r}: task.task_token is LAVENDER's (head_style mlm)")

    def task_vector(self) -> Optional[torch.Tensor]:
        """This task's row of the task embedding when `task.task_token` is on, else None."""
        if not self.task_token or self.task_token_name is None:
            return None
        return self.heads["task_embedding"].weight[TASK_TOKEN_ROWS[self.task_token_name]]

    # ---- heads
    def _mlm_head(self) -> nn.Module:
        vocab = self.model.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} entries but the model's text vocabulary "
                             f"only {vocab}: set model.overrides.vocab_size")
        return MLMHead(self.model.hidden_size, vocab, tie_to=self.model.word_embeddings if self.tie_mlm_head else None)

    def _score_head(self, out: int = 1) -> nn.Module:
        return ScoreHead(self.model.hidden_size, out, dropout=head_dropout(self.model))

    def _true_false_ids(self) -> Tuple[int, int]:
        purpose = f"task {self.cfg.name} (head_style mlm)"
        return word_id(self.tokenizer, "true", purpose), word_id(self.tokenizer, "false", purpose)

    def _add_match_head(self) -> None:
        """The head `match_scores` needs: the MLM head + true/false ids (mlm style) or a 1-way score head."""
        if self.head_style == "mlm":
            self.heads["mlm"] = self._mlm_head()
            self.true_id, self.false_id = self._true_false_ids()
        else:
            self.heads["score"] = self._score_head(1)

    # ---- pair scoring shared by matching-style tasks (pretraining VTM, MC options, retrieval, zero-shot)
    def _true_false_at_mask(self, video_tokens: torch.Tensor, video_mask: Optional[torch.Tensor],
                            text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """MLM logits `(N, V)` at the [MASK] appended to each text (LAVENDER's answer slot)."""
        ids, mask, position = append_answer_mask(text_ids, text_mask, self.special)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, ids, mask, self.task_vector())
        return self.heads["mlm"](gather_positions(hidden, position + video_tokens.shape[1]))

    def match_scores(self, video_tokens: torch.Tensor, video_mask: Optional[torch.Tensor], text_ids: torch.Tensor,
                     text_mask: torch.Tensor) -> torch.Tensor:
        """Row-aligned pairs -> matching logits `(N,)`: score head on pooled, or true/false log-odds at [MASK]."""
        if self.head_style == "mlm":
            logits = self._true_false_at_mask(video_tokens, video_mask, text_ids, text_mask)
            return true_false_logits(logits, self.true_id, self.false_id)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, text_ids, text_mask)
        return self.heads["score"](pooled_of(hidden, video_tokens.shape[1])).squeeze(-1).float()

    def match_mlm_loss(self, video_tokens: torch.Tensor, video_mask: Optional[torch.Tensor], text_ids: torch.Tensor,
                       text_mask: torch.Tensor, is_match: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """LAVENDER matching loss: MLM cross-entropy over the whole vocabulary at [MASK] towards the word
        "true" (matching pair) or "false". Returns (loss, true/false log-odds `(N,)`)."""
        logits = self._true_false_at_mask(video_tokens, video_mask, text_ids, text_mask).float()
        target = torch.where(is_match.bool(), torch.full_like(is_match, self.true_id, dtype=torch.long),
                             torch.full_like(is_match, self.false_id, dtype=torch.long))
        return F.cross_entropy(logits, target), true_false_logits(logits, self.true_id, self.false_id)


class DownstreamTask(VideoTextTask):
    """Common state of the finetuning tasks: options (`task.options`, checked against `option_defaults`)
    and, for the mlm head style, LAVENDER's task-token table. Subclasses build their heads in `build`."""

    option_defaults: Dict[str, Any] = {}

    def build(self) -> None:
        super().build()
        self.options = parse_options(self.cfg.name, self.cfg.options, self.option_defaults)
        if self.head_style == "mlm":
            trainable = self.task_token and self.task_token_name is not None
            self.heads["task_embedding"] = task_embedding_head(self.model, trainable)
