"""VIMPAC 3D block masking: shapes, the block rule, union, [PAD] exclusion, induced ratios."""

from __future__ import annotations

import pytest
import torch

from violet_ds.masking import (
    block_length_limits,
    block_mask_3d,
    blocks_for_ratio,
    expected_block_ratio,
    iid_mask_3d,
    mask_vq_tokens,
    measure_block_ratio,
)

PAPER_GRIDS = [(5, 16, 16), (5, 32, 32), (10, 16, 16), (10, 32, 32)]


def _reference_block_mask(batch, t, h, w, num_blocks, generator):
    """Loop reference drawing the same random numbers in the same order as the vectorised code."""
    limits = block_length_limits(t, h, w)
    sizes = (t, h, w)
    draws = []
    for size, max_len in zip(sizes, limits):
        lengths = torch.randint(1, max_len + 1, (batch, num_blocks), generator=generator)
        starts = (torch.rand((batch, num_blocks), generator=generator) * (size - lengths + 1).float()).long()
        draws.append((starts, lengths))
    mask = torch.zeros(batch, t, h, w, dtype=torch.bool)
    for b in range(batch):
        for k in range(num_blocks):
            (st, lt), (sh, lh), (sw, lw) = [(s[b, k].item(), l[b, k].item()) for s, l in draws]
            assert 0 <= st and st + lt <= t and 0 <= sh and sh + lh <= h and 0 <= sw and sw + lw <= w
            mask[b, st:st + lt, sh:sh + lh, sw:sw + lw] = True
    return mask


def test_shape_dtype_and_determinism():
    gen = torch.Generator().manual_seed(3)
    mask = block_mask_3d(4, 5, 16, 16, 5, generator=gen)
    assert mask.shape == (4, 5, 16, 16) and mask.dtype == torch.bool
    again = block_mask_3d(4, 5, 16, 16, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, again)
    assert mask.flatten(1).any(1).all(), "every sample gets at least one block"


def test_limits_follow_the_paper_rule():
    assert block_length_limits(5, 16, 16) == (3, 8, 8)
    assert block_length_limits(10, 32, 32) == (6, 16, 16)
    assert block_length_limits(1, 1, 1) == (1, 1, 1)


def test_union_matches_loop_reference():
    for grid, blocks in [((5, 16, 16), 5), ((10, 8, 12), 7), ((3, 5, 4), 3)]:
        fast = block_mask_3d(6, *grid, blocks, generator=torch.Generator().manual_seed(11))
        slow = _reference_block_mask(6, *grid, blocks, torch.Generator().manual_seed(11))
        assert torch.equal(fast, slow), grid


def test_single_block_is_one_box_within_limits_and_lengths_cover_range():
    t, h, w = 6, 10, 8
    limits = block_length_limits(t, h, w)
    mask = block_mask_3d(3000, t, h, w, 1, generator=torch.Generator().manual_seed(0))
    extents = []
    for axis in range(3):
        other = tuple(d for d in (1, 2, 3) if d != axis + 1)
        covered = mask.any(dim=other)  # (N, size) along this axis
        extents.append(covered.sum(1))
        # a box: the covered indices along each axis are contiguous
        first = covered.float().argmax(1)
        last = covered.shape[1] - 1 - covered.flip(1).float().argmax(1)
        assert torch.equal(last - first + 1, covered.sum(1))
    volume = mask.flatten(1).sum(1)
    assert torch.equal(volume, extents[0] * extents[1] * extents[2]), "the mask is exactly the box"
    for extent, limit in zip(extents, limits):
        assert int(extent.min()) == 1 and int(extent.max()) == limit
        # uniform lengths: every value 1..limit occurs
        assert set(extent.tolist()) == set(range(1, limit + 1))


def test_pad_positions_are_never_masked():
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8192, (8, 5, 16, 16), generator=gen)
    pad_id = 8193
    tokens[:, 3:] = pad_id  # short videos: the last two frames are padding
    tokens[0, :, :2] = pad_id
    for strategy in ("block", "iid"):
        mask = mask_vq_tokens(tokens, pad_id, strategy=strategy, num_blocks=8, ratio=0.5, generator=gen)
        assert not mask[tokens == pad_id].any(), strategy
        assert mask[tokens != pad_id].any(), strategy
    exclude = torch.zeros(2, 4, 6, 6, dtype=torch.bool)
    exclude[:, :, :3] = True
    mask = block_mask_3d(2, 4, 6, 6, 30, exclude=exclude, generator=gen)
    assert not mask[exclude].any() and mask[~exclude].any()
    with pytest.raises(ValueError, match="exclude has shape"):
        block_mask_3d(2, 4, 6, 6, 3, exclude=exclude[:, :2])


def test_auto_block_count_matches_paper_and_is_used():
    assert [blocks_for_ratio(*grid) for grid in PAPER_GRIDS] == [5, 6, 6, 7]
    auto = block_mask_3d(5, 5, 16, 16, None, generator=torch.Generator().manual_seed(4))
    fixed = block_mask_3d(5, 5, 16, 16, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(auto, fixed)


def test_induced_ratio_table_at_paper_resolutions():
    """Measured masked fraction (1024 draws) vs the exact expectation; printed as a table."""
    rows = ["grid        " + "".join(f"   K={k} meas/exact  " for k in range(4, 9))]
    for grid in PAPER_GRIDS:
        cells = []
        for blocks in range(4, 9):
            measured = measure_block_ratio(*grid, blocks, samples=1024, seed=blocks)
            exact = expected_block_ratio(*grid, blocks)
            assert abs(measured - exact) < 0.01, (grid, blocks, measured, exact)
            cells.append(f"  {measured:.4f}/{exact:.4f}    ")
        rows.append(f"{'x'.join(map(str, grid)):<12}" + "".join(cells))
    print("\n" + "\n".join(rows))
    # the paper's block counts land near 15%
    for grid, blocks in zip(PAPER_GRIDS, [5, 6, 6, 7]):
        assert 0.13 < expected_block_ratio(*grid, blocks) < 0.16


def test_iid_ratio_and_bad_arguments():
    mask = iid_mask_3d(64, 5, 16, 16, 0.15, generator=torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.15) < 0.01
    with pytest.raises(ValueError):
        iid_mask_3d(1, 5, 16, 16, 1.5)
    with pytest.raises(ValueError, match="at least 1x1x1"):
        block_mask_3d(1, 0, 16, 16, 3)
    with pytest.raises(ValueError, match="unknown VIMPAC masking strategy"):
        mask_vq_tokens(torch.zeros(1, 2, 2, 2, dtype=torch.long), 8193, strategy="tube")
