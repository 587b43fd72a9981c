"""VIOLET masked visual modelling: which video-transformer tokens to hide, and hiding them.

Masks live on the VT token grid `(B, T, h, w)` (one token = one 32x32 pixel block of one frame; the
per-frame [CLS_v] is never masked). Three strategies (docs/reference.md#2-pretraining-objectives):

- `rm` random: a uniformly random subset of the tokens of each clip;
- `bm` blockwise: a union of random 3D blocks (temporal length in [1, T-1], height in
  [1, floor(2h/3)), width in [1, floor(2w/3)));
- `am` attended: positions drawn without replacement with probability proportional to the attention
  they receive (from an extra no-grad pass of the model).

Unlike the official code, every strategy masks exactly `round(ratio * T*h*w)` tokens per clip (at least
one), so the configured ratio is what the loss sees. The strategy is drawn per sample.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

STRATEGIES = ("rm", "bm", "am")


def num_masked(grid: tuple[int, int, int], ratio: float) -> int:
    """Tokens masked per clip for a `(T, h, w)` grid: round(ratio * T*h*w), at least 1 when ratio > 0."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"visual mask ratio must be in [0, 1), got {ratio}")
    total = grid[0] * grid[1] * grid[2]
    return 0 if ratio == 0 else max(1, min(total, round(ratio * total)))


def _keep_top(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of each row's `counts[b]` highest scores (`scores (B, N)`, -inf never kept)."""
    order = scores.argsort(dim=1, descending=True)
    ranks = order.argsort(dim=1)
    return (ranks < counts[:, None]) & torch.isfinite(scores)


def random_mask(batch: int, grid: tuple[int, int, int], ratio: float, *,
                generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """`rm`: a uniform random subset of exactly num_masked tokens per clip -> bool `(B, T, h, w)`."""
    total = grid[0] * grid[1] * grid[2]
    count = torch.full((batch,), num_masked(grid, ratio), device=device)
    scores = torch.rand(batch, total, generator=generator, device=device)
    return _keep_top(scores, count).view(batch, *grid)


def _block_extent_limits(grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Largest allowed (t, h, w) block lengths (inclusive), at least 1 on tiny grids."""
    t, h, w = grid
    return max(1, t - 1), max(1, (2 * h) // 3 - 1), max(1, (2 * w) // 3 - 1)


def blockwise_mask(batch: int, grid: tuple[int, int, int], ratio: float, *,
                   generator: Optional[torch.Generator] = None, device=None,
                   max_blocks: int = 256) -> torch.Tensor:
    """`bm`: union of random 3D blocks, added until num_masked tokens are covered -> bool `(B, T, h, w)`.

    The block that crosses the target keeps only as many of its new tokens as needed (chosen at random),
    so the count is exact while the mask stays made of blocks.
    """
    t, h, w = grid
    target = num_masked(grid, ratio)
    mask = torch.zeros(batch, t, h, w, dtype=torch.bool, device=device)
    if target == 0:
        return mask
    max_t, max_h, max_w = _block_extent_limits(grid)
    axes = [torch.arange(n, device=device) for n in grid]
    for _ in range(max_blocks):
        covered = mask.flatten(1).sum(1)
        need = target - covered
        if bool((need <= 0).all()):
            break
        lengths, starts = [], []
        for limit, size in zip((max_t, max_h, max_w), grid):
            length = torch.randint(1, limit + 1, (batch,), generator=generator, device=device)
            start = (torch.rand(batch, generator=generator, device=device) * (size - length + 1)).long()
            lengths.append(length)
            starts.append(start)
        inside = [(axis[None] >= s[:, None]) & (axis[None] < (s + n)[:, None])
                  for axis, s, n in zip(axes, starts, lengths)]
        block = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
        new = (block & ~mask).flatten(1) & (need > 0)[:, None]
        scores = torch.where(new, torch.rand(new.shape, generator=generator, device=device),
                             torch.full(new.shape, float("-inf"), device=device))
        mask |= _keep_top(scores, need.clamp(min=0)).view_as(mask)
    return mask


def attended_mask(attention: torch.Tensor, ratio: float, *,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`am`: sample num_masked tokens per clip with probability proportional to `attention (B, T, h, w)`."""
    batch, *grid = attention.shape
    count = num_masked(tuple(grid), ratio)
    weights = attention.float().flatten(1).clamp(min=0)
    # a clip whose attention is all zero (or not finite) falls back to uniform sampling
    bad = ~torch.isfinite(weights).all(1) | (weights.sum(1) <= 0)
    weights = torch.where(bad[:, None], torch.ones_like(weights), torch.nan_to_num(weights))
    # tiny floor: multinomial without replacement needs `count` non-zero weights
    weights = weights + 1e-12 * weights.sum(1, keepdim=True)
    chosen = torch.multinomial(weights, count, replacement=False, generator=generator)
    mask = torch.zeros_like(weights, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask.view(batch, *grid)


def video_attention_grid(attention: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """`(B, Nv+L)` attention received per position -> `(B, T, h, w)` at video patch tokens.

    The per-frame [CLS_v] and the text positions are dropped (they are never masked).
    """
    t, h, w = grid
    video = attention[:, : t * (1 + h * w)].reshape(attention.shape[0], t, 1 + h * w)
    return video[:, :, 1:].reshape(-1, t, h, w)


def mask_video_tokens(batch: int, grid: tuple[int, int, int], strategies: Sequence[str], ratio: float, *,
                      attention: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                      device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one strategy per sample from `strategies` and build its mask.

    Returns `(mask bool (B, T, h, w), strategy index long (B,))` where the index points into
    `strategies`. `attention (B, T, h, w)` is required when a sample draws `am`.
    """
    unknown = [name for name in strategies if name not in STRATEGIES]
    if unknown or not strategies:
        raise ValueError(f"unknown visual masking strategies {unknown}; choose from {list(STRATEGIES)}")
    # the strategy per sample is drawn on the CPU (unless the generator lives on another device), so skipping
    # an unused strategy needs no sync with the GPU; on a CPU run the draws are those of the device itself
    host_generator = generator is None or generator.device.type == "cpu"
    drawn_on = "cpu" if host_generator else device
    which_host = torch.randint(len(strategies), (batch,), generator=generator, device=drawn_on)
    which = which_host.to(device, non_blocking=True)
    drawn = set(which_host.tolist())
    mask = torch.zeros(batch, *grid, dtype=torch.bool, device=device)
    for index, name in enumerate(strategies):
        if index not in drawn:
            continue
        rows = which == index
        if name == "rm":
            part = random_mask(batch, grid, ratio, generator=generator, device=device)
        elif name == "bm":
            # built where the strategies were drawn: its loop reads the covered count every block, a host sync
            # per block on an accelerator (on a CPU run the same draws as before)
            part = blockwise_mask(batch, grid, ratio, generator=generator, device=drawn_on)
            part = part.to(device, non_blocking=True)
        else:
            if attention is None:
                raise ValueError("attended masking ('am') needs the attention each token receives")
            part = attended_mask(attention, ratio, generator=generator)
        mask = torch.where(rows.view(-1, 1, 1, 1), part, mask)
    return mask, which


def needs_attention(strategies: Sequence[str]) -> bool:
    return "am" in strategies


def apply_video_mask(video: torch.Tensor, token_mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Zero the pixels of masked tokens: `video (B, T, C, H, W)`, `token_mask (B, T, h, w)` -> new video."""
    _, _, _, height, width = video.shape
    h, w = token_mask.shape[-2:]
    if height % h or width % w:
        raise ValueError(f"frame {height}x{width} is not a multiple of the token grid {h}x{w}")
    pixel = token_mask.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)
    return video.masked_fill(pixel[:, :, None], fill)
