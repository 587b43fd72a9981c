"""VIMPAC masking on a VQ-token grid ``(T, H, W)``: 3D block masking and i.i.d. masking.

Block rule (docs/reference.md#3-vimpac, following the released code and the paper's ratio table): for each of
``K`` blocks draw a temporal length uniform in ``1..floor(2T/3)``, a height uniform in ``1..floor(H/2)``
and a width uniform in ``1..floor(W/2)`` (all inclusive), then starts uniform so that the block lies
fully inside the grid; the mask is the union of the blocks, minus excluded ([PAD]) positions.

Everything is vectorised over the batch and the blocks: the union is one batched contraction of
per-axis indicator vectors, so no Python loop runs over samples, blocks or frames.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

__all__ = [
    "block_mask_3d",
    "iid_mask_3d",
    "mask_vq_tokens",
    "block_length_limits",
    "expected_block_ratio",
    "blocks_for_ratio",
    "measure_block_ratio",
]


def block_length_limits(t: int, h: int, w: int) -> tuple[int, int, int]:
    """Largest block length per axis: ``(floor(2T/3), floor(H/2), floor(W/2))``, each at least 1.

    The lower bound of 1 keeps degenerate grids (one frame, one row) maskable instead of failing.
    """
    _check_grid(t, h, w)
    return max(1, (2 * t) // 3), max(1, h // 2), max(1, w // 2)


def _check_grid(t: int, h: int, w: int) -> None:
    if min(t, h, w) < 1:
        raise ValueError(f"token grid must be at least 1x1x1, got t={t}, h={h}, w={w}")


def _axis_indicator(batch: int, num_blocks: int, size: int, max_len: int,
                    generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Float ``(batch, num_blocks, size)``: 1 where a random block covers the index along one axis."""
    lengths = torch.randint(1, max_len + 1, (batch, num_blocks), generator=generator, device=device)
    # start uniform in 0..size-length inclusive; per-element bounds, hence rand * count floored
    count = (size - lengths + 1).to(torch.float32)
    starts = (torch.rand((batch, num_blocks), generator=generator, device=device) * count).long()
    starts = torch.minimum(starts, size - lengths)  # rand() < 1 already; guards float rounding
    index = torch.arange(size, device=device)
    inside = (index >= starts[..., None]) & (index < (starts + lengths)[..., None])
    return inside.to(torch.float32)


def block_mask_3d(batch: int, t: int, h: int, w: int, num_blocks: Optional[int] = None, *,
                  generator: Optional[torch.Generator] = None,
                  device: Optional[torch.device | str] = None,
                  exclude: Optional[torch.Tensor] = None,
                  target_ratio: float = 0.15) -> torch.Tensor:
    """VIMPAC 3D block mask: bool ``(batch, t, h, w)``, True = masked.

    Args:
        batch, t, h, w: batch size and token-grid shape.
        num_blocks: blocks per sample; ``None`` picks the count whose expected masked ratio is
            closest to ``target_ratio`` (5 at 5x16x16, 6 at 5x32x32 and 10x16x16, 7 at 10x32x32).
        generator: torch generator for reproducible masks (its device decides ``device`` when
            ``device`` is not given).
        device: device of the result.
        exclude: optional bool ``(batch, t, h, w)``; True positions (e.g. [PAD]) are never masked.
        target_ratio: used only when ``num_blocks`` is None.
    """
    _check_grid(t, h, w)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if num_blocks is None:
        num_blocks = blocks_for_ratio(t, h, w, target_ratio)
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if device is None:
        device = generator.device if generator is not None else (
            exclude.device if exclude is not None else torch.device("cpu"))
    device = torch.device(device)
    if num_blocks == 0 or batch == 0:
        mask = torch.zeros((batch, t, h, w), dtype=torch.bool, device=device)
    else:
        max_t, max_h, max_w = block_length_limits(t, h, w)
        in_t = _axis_indicator(batch, num_blocks, t, max_t, generator, device)
        in_h = _axis_indicator(batch, num_blocks, h, max_h, generator, device)
        in_w = _axis_indicator(batch, num_blocks, w, max_w, generator, device)
        # number of blocks covering each position; > 0 is the union
        covered = torch.einsum("bkt,bkh,bkw->bthw", in_t, in_h, in_w)
        mask = covered > 0.5
    return _apply_exclude(mask, exclude)


def _apply_exclude(mask: torch.Tensor, exclude: Optional[torch.Tensor]) -> torch.Tensor:
    if exclude is None:
        return mask
    if exclude.shape != mask.shape:
        raise ValueError(f"exclude has shape {tuple(exclude.shape)}, mask has {tuple(mask.shape)}")
    return mask & ~exclude.to(device=mask.device, dtype=torch.bool)


def iid_mask_3d(batch: int, t: int, h: int, w: int, ratio: float = 0.15, *,
                generator: Optional[torch.Generator] = None,
                device: Optional[torch.device | str] = None,
                exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """I.i.d. masking for comparison with blocks: each position masked with probability ``ratio``."""
    _check_grid(t, h, w)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if device is None:
        device = generator.device if generator is not None else (
            exclude.device if exclude is not None else torch.device("cpu"))
    mask = torch.rand((batch, t, h, w), generator=generator, device=device) < ratio
    return _apply_exclude(mask, exclude)


def mask_vq_tokens(tokens: torch.Tensor, pad_id: int, *, strategy: str = "block",
                   ratio: float = 0.15, num_blocks: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mask for a token batch ``(B, T, H, W)`` with its [PAD] positions excluded.

    ``strategy`` is ``"block"`` (``num_blocks`` or the count for ``ratio``) or ``"iid"`` (``ratio``).
    """
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be (B, T, H, W), got shape {tuple(tokens.shape)}")
    batch, t, h, w = tokens.shape
    exclude = tokens == pad_id
    if strategy == "block":
        return block_mask_3d(batch, t, h, w, num_blocks, generator=generator, device=tokens.device,
                             exclude=exclude, target_ratio=ratio)
    if strategy == "iid":
        return iid_mask_3d(batch, t, h, w, ratio, generator=generator, device=tokens.device,
                           exclude=exclude)
    raise ValueError(f"unknown VIMPAC masking strategy {strategy!r}; expected 'block' or 'iid'")


@lru_cache(maxsize=None)
def _axis_cover_probability(size: int, max_len: int) -> tuple[float, ...]:
    """Probability that one random block covers each index along one axis (exact)."""
    cover = [0.0] * size
    for length in range(1, max_len + 1):
        starts = size - length + 1
        for start in range(starts):
            for index in range(start, start + length):
                cover[index] += 1.0 / (starts * max_len)
    return tuple(cover)


def expected_block_ratio(t: int, h: int, w: int, num_blocks: int) -> float:
    """Exact expected masked fraction of ``block_mask_3d`` (no exclusion).

    Blocks are independent and each block's axes are independent, so a position is left unmasked
    with probability ``(1 - p_t p_h p_w)^K`` where ``p_axis`` is the single-block cover probability.
    """
    max_t, max_h, max_w = block_length_limits(t, h, w)
    p_t = torch.tensor(_axis_cover_probability(t, max_t), dtype=torch.float64)
    p_h = torch.tensor(_axis_cover_probability(h, max_h), dtype=torch.float64)
    p_w = torch.tensor(_axis_cover_probability(w, max_w), dtype=torch.float64)
    cover = p_t[:, None, None] * p_h[None, :, None] * p_w[None, None, :]
    return float((1.0 - (1.0 - cover) ** num_blocks).mean())


@lru_cache(maxsize=None)
def blocks_for_ratio(t: int, h: int, w: int, target_ratio: float = 0.15, max_blocks: int = 64) -> int:
    """Number of blocks whose expected masked ratio is closest to ``target_ratio``."""
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio}")
    best, best_gap = 1, float("inf")
    for count in range(1, max_blocks + 1):
        ratio = expected_block_ratio(t, h, w, count)
        gap = abs(ratio - target_ratio)
        if gap < best_gap:
            best, best_gap = count, gap
        if ratio > target_ratio:  # the ratio grows with the count: nothing further can be closer
            break
    return best


def measure_block_ratio(t: int, h: int, w: int, num_blocks: int, samples: int = 4096,
                        seed: int = 0) -> float:
    """Empirical masked fraction of ``block_mask_3d`` over ``samples`` draws."""
    generator = torch.Generator().manual_seed(seed)
    mask = block_mask_3d(samples, t, h, w, num_blocks, generator=generator)
    return float(mask.float().mean())
