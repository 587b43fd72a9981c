"""Task heads on top of the VIOLET backbone. Tasks own them (`task.heads[<name>]`), the backbone never does.

Standard names in a task's `heads` ModuleDict (and in converted official checkpoints):
`mlm` (MLMHead), `score` (ScoreHead, out=1), `answer` (ScoreHead, out=answer vocabulary),
`mvm` (MVMHead), `classifier` (Classifier), `task_embedding` (TaskEmbedding, LAVENDER's `emb_task`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class MLMHead(nn.Module):
    """BERT masked-LM prediction head: dense -> GELU -> LayerNorm -> decoder to the vocabulary.

    With `tie_to` the decoder reuses that embedding matrix (BERT's default, 23M fewer parameters at
    BERT-base); the embedding is referenced, not registered, so the weight appears once in a state dict
    (under the backbone). Without it the decoder has its own weight (`decoder.weight`), as in the official
    VIOLET checkpoints. The output bias is `bias` in both cases.
    """

    def __init__(self, hidden: int, vocab_size: int, tie_to: Optional[nn.Embedding] = None,
                 layer_norm_eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(hidden, hidden)
        self.transform.LayerNorm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        if tie_to is not None:
            if tuple(tie_to.weight.shape) != (vocab_size, hidden):
                raise ValueError(f"tied embedding has shape {tuple(tie_to.weight.shape)}, "
                                 f"expected ({vocab_size}, {hidden})")
            self.decoder = None
            # a plain attribute keeps the shared weight out of this module's parameters
            object.__setattr__(self, "_tied_embedding", tie_to)
        else:
            self.decoder = nn.Linear(hidden, vocab_size, bias=False)
            nn.init.normal_(self.decoder.weight, std=0.02)
            object.__setattr__(self, "_tied_embedding", None)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.normal_(self.transform.dense.weight, std=0.02)
        nn.init.zeros_(self.transform.dense.bias)

    @property
    def tied(self) -> bool:
        return self._tied_embedding is not None

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._tied_embedding.weight if self.tied else self.decoder.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        return F.linear(x, self.decoder_weight, self.bias)


def head_dropout(model: nn.Module) -> float:
    """Dropout for task heads: the VIOLET backbone's hidden dropout (0.1 in BERT / the official heads; 0 in
    violet-tiny)."""
    return float(model.cfg.hidden_dropout)


class ScoreHead(nn.Sequential):
    """`Dropout -> Linear(h, 2h) -> ReLU -> Linear(2h, out)` on the pooled output (official `fc.1`, `fc.3`).

    out=1: VTM / retrieval / multiple-choice scores; out=answer vocabulary: open-ended QA.
    """

    def __init__(self, hidden: int, out: int = 1, dropout: float = 0.1, zero_init: bool = True):
        super().__init__(nn.Dropout(dropout), nn.Linear(hidden, 2 * hidden), nn.ReLU(inplace=True),
                         nn.Linear(2 * hidden, out))
        if zero_init:
            # all scores start equal (loss = ln(#candidates)): with a random last layer the initial scores
            # vary by text and video alone, and the quickest way down is to shrink the head until its
            # ReLUs die, which leaves matching stuck at chance when the backbone is trained from scratch
            nn.init.zeros_(self[3].weight)
            nn.init.zeros_(self[3].bias)


def AnswerHead(hidden: int, num_answers: int, dropout: float = 0.1) -> ScoreHead:  # noqa: N802
    """Open-ended QA over a fixed answer vocabulary (the official classifier variant)."""
    return ScoreHead(hidden, out=num_answers, dropout=dropout)


MVM_KINDS = ("dense", "token", "feature")


class MVMHead(nn.Module):
    """Masked-visual-modeling head on video-token hidden states `(B, T, h, w, D)` (per-frame CLS removed).

    - `dense`:   1x1 conv to `channels * patch**2` per token + PixelShuffle(patch) -> `(B, T, C, patch*h, patch*w)`
                 (official `decoder_<target>.0`);
    - `token`:   `Dropout, Linear(D, 2D), ReLU, Linear(2D, C)` -> logits `(B, T, h, w, C)` (official `fc_mvm`);
    - `feature`: same MLP -> regressed features `(B, T, h, w, C)`.
    """

    def __init__(self, hidden: int, kind: str, channels: int, patch: int = 32, dropout: float = 0.1):
        super().__init__()
        if kind not in MVM_KINDS:
            raise ValueError(f"MVM head kind must be one of {MVM_KINDS}, got {kind!r}")
        self.kind, self.channels, self.patch = kind, channels, patch
        if kind == "dense":
            self.proj = nn.Conv2d(hidden, channels * patch * patch, kernel_size=1)
            self.shuffle = nn.PixelShuffle(patch)
        else:
            self.mlp = ScoreHead(hidden, out=channels, dropout=dropout, zero_init=False)

    def forward(self, video_hidden: torch.Tensor) -> torch.Tensor:
        if video_hidden.dim() != 5:
            raise ValueError(f"MVMHead expects (B, T, h, w, D), got {tuple(video_hidden.shape)}")
        if self.kind != "dense":
            return self.mlp(video_hidden)
        b, t, h, w, d = video_hidden.shape
        x = video_hidden.reshape(b * t, h, w, d).permute(0, 3, 1, 2)
        x = self.shuffle(self.proj(x))
        return x.reshape(b, t, self.channels, h * self.patch, w * self.patch)


class Classifier(nn.Linear):
    """Linear classifier (action recognition); zero-initialised as VIMPAC fine-tuning does when asked."""

    def __init__(self, hidden: int, num_classes: int, zero_init: bool = False):
        super().__init__(hidden, num_classes)
        if zero_init:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
        else:
            nn.init.normal_(self.weight, std=0.02)
            nn.init.zeros_(self.bias)


class TaskEmbedding(nn.Embedding):
    """LAVENDER's learned task-token table (official `emb_task`, `(num_tasks, D)`)."""

    def __init__(self, num_tasks: int, hidden: int):
        super().__init__(num_tasks, hidden)
        nn.init.normal_(self.weight, std=0.02)


__all__ = ["MLMHead", "ScoreHead", "AnswerHead", "MVMHead", "Classifier", "TaskEmbedding", "MVM_KINDS"]
