"""Masked language modelling: choose text positions to predict and corrupt the input ids.

Special tokens ([CLS], [SEP], [PAD], ...) and padding are never chosen; their ids always come from the
tokenizer, never from constants here.
"""

from __future__ import annotations

import functools
from typing import Literal, Optional, Sequence

import torch

IGNORE_INDEX = -100
"""label of positions that carry no MLM loss (torch's cross-entropy default)"""


def maskable_positions(text_ids: torch.Tensor, text_mask: torch.Tensor,
                       special_ids: Sequence[int]) -> torch.Tensor:
    """Bool `(B, L)`: real (unpadded) tokens that are not special tokens."""
    special = torch.as_tensor(list(special_ids), dtype=text_ids.dtype, device=text_ids.device)
    return text_mask.bool() & ~torch.isin(text_ids, special)


def mask_text(text_ids: torch.Tensor, text_mask: torch.Tensor, *, mask_id: int, special_ids: Sequence[int],
              vocab_size: int, probability: float = 0.15, mode: Literal["mask", "bert"] = "mask",
              generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM corruption of a batch of token ids.

    Each maskable token is chosen independently with `probability`. `mode="mask"` replaces every chosen
    token by [MASK] (the official VIOLET code); `mode="bert"` uses BERT's 80% [MASK] / 10% random
    non-special token / 10% unchanged. Returns `(input_ids, labels)` where labels hold the original id
    at chosen positions and `IGNORE_INDEX` elsewhere.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"MLM probability must be in [0, 1], got {probability}")
    if mode not in ("mask", "bert"):
        raise ValueError(f"MLM mode must be 'mask' or 'bert', got {mode!r}")
    device = text_ids.device
    maskable = maskable_positions(text_ids, text_mask, special_ids)
    draw = torch.rand(text_ids.shape, generator=generator, device=device)
    chosen = maskable & (draw < probability)
    labels = torch.where(chosen, text_ids, torch.full_like(text_ids, IGNORE_INDEX))
    # torch.where rather than boolean-mask assignment: the latter needs the count of chosen positions on the
    # host (a sync per call on a GPU)
    if mode == "mask":
        return torch.where(chosen, mask_id, text_ids), labels
    action = torch.rand(text_ids.shape, generator=generator, device=device)
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    allowed = _ordinary_ids(vocab_size, tuple(sorted(set(special_ids))), device)
    pick = torch.randint(len(allowed), text_ids.shape, generator=generator, device=device)
    input_ids = torch.where(to_mask, mask_id, text_ids)
    return torch.where(to_random, allowed[pick].to(text_ids.dtype), input_ids), labels


@functools.lru_cache(maxsize=None)
def _ordinary_ids(vocab_size: int, special_ids: tuple, device) -> torch.Tensor:
    """The non-special token ids `(vocab_size - #special,)`, built once per vocabulary and device."""
    special = set(special_ids)
    return torch.tensor([i for i in range(vocab_size) if i not in special], device=device)
