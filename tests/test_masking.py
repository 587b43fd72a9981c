"""MLM text masking (mask / bert modes, specials never masked) and VIOLET visual masking (rm / bm / am)."""

from __future__ import annotations

import pytest
import torch

from violet_ds.masking.text import IGNORE_INDEX, mask_text, maskable_positions
from violet_ds.masking.visual import (apply_video_mask, attended_mask, blockwise_mask, mask_video_tokens,
                                      num_masked, random_mask, video_attention_grid)

CLS, SEP, PAD, MASK, UNK = 2, 3, 0, 4, 1
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 100


def _text_batch(batch: int = 64, length: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, length + 1, (batch,), generator=generator)
    ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    positions = torch.arange(length)[None]
    mask = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[mask == 0] = PAD
    # a few [UNK] inside the text: special too, never a prediction target
    ids[:, 2] = UNK
    return ids, mask


@pytest.mark.parametrize("mode", ["mask", "bert"])
def test_mlm_never_masks_special_or_padding_and_honours_probability(mode):
    ids, mask = _text_batch()
    generator = torch.Generator().manual_seed(1)
    masked, labels = mask_text(ids, mask, mask_id=MASK, special_ids=SPECIAL, vocab_size=VOCAB, probability=0.15,
                               mode=mode, generator=generator)
    chosen = labels != IGNORE_INDEX
    maskable = maskable_positions(ids, mask, SPECIAL)
    assert not (chosen & ~maskable).any(), "a special token or padding was chosen"
    # specials and padding are left exactly as they were
    assert torch.equal(masked[~maskable], ids[~maskable])
    assert torch.equal(labels[chosen], ids[chosen])
    ratio = chosen.sum().item() / maskable.sum().item()
    assert 0.12 < ratio < 0.18, ratio
    if mode == "mask":
        assert (masked[chosen] == MASK).all()
        assert torch.equal(masked[~chosen], ids[~chosen])
    else:
        fraction_mask = (masked[chosen] == MASK).float().mean().item()
        unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
        assert 0.7 < fraction_mask < 0.9 and 0.03 < unchanged < 0.2
        # random replacements are never special tokens
        replaced = chosen & (masked != MASK) & (masked != ids)
        assert not torch.isin(masked[replaced], torch.tensor(SPECIAL)).any()


def test_mlm_rejects_bad_arguments():
    ids, mask = _text_batch(4)
    with pytest.raises(ValueError, match="probability"):
        mask_text(ids, mask, mask_id=MASK, special_ids=SPECIAL, vocab_size=VOCAB, probability=1.5)
    with pytest.raises(ValueError, match="mode"):
        mask_text(ids, mask, mask_id=MASK, special_ids=SPECIAL, vocab_size=VOCAB, mode="random")


@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
@pytest.mark.parametrize("strategy", ["rm", "bm", "am"])
def test_visual_masking_honours_ratio_exactly(strategy, ratio):
    grid = (4, 7, 7)
    batch = 16
    generator = torch.Generator().manual_seed(3)
    attention = torch.rand(batch, *grid, generator=generator)
    mask, which = mask_video_tokens(batch, grid, [strategy], ratio, attention=attention, generator=generator)
    assert mask.shape == (batch, *grid) and mask.dtype == torch.bool
    assert (which == 0).all()
    expected = round(ratio * 4 * 7 * 7)
    assert (mask.flatten(1).sum(1) == expected).all()


def test_blockwise_mask_is_made_of_blocks_within_limits():
    grid = (4, 7, 7)
    generator = torch.Generator().manual_seed(5)
    mask = blockwise_mask(32, grid, 0.15, generator=generator)
    # a block never spans all frames (t in [1, T-1]) nor more than floor(2h/3)-1 rows: the first block
    # alone leaves some frame untouched in most clips, and masked tokens cluster (neighbours masked)
    neighbours = (mask[:, :, 1:, :] & mask[:, :, :-1, :]).sum() + (mask[:, :, :, 1:] & mask[:, :, :, :-1]).sum()
    random = random_mask(32, grid, 0.15, generator=generator)
    random_neighbours = (random[:, :, 1:, :] & random[:, :, :-1, :]).sum() + (random[:, :, :, 1:] & random[:, :, :, :-1]).sum()
    assert neighbours > 2 * random_neighbours
    one_block = blockwise_mask(200, grid, 1 / 196, generator=generator)
    assert (one_block.flatten(1).sum(1) == 1).all()


def test_attended_mask_prefers_attended_tokens():
    grid = (2, 4, 4)
    attention = torch.full((64, *grid), 1e-4)
    attention[:, 0, 0, :] = 1.0  # 4 hot tokens per clip
    mask = attended_mask(attention, 4 / 32, generator=torch.Generator().manual_seed(0))
    assert mask[:, 0, 0, :].float().mean() > 0.95


def test_attention_grid_drops_frame_cls_and_text():
    t, h, w, text = 2, 2, 3, 5
    received = torch.arange(t * (1 + h * w) + text, dtype=torch.float32)[None]
    grid = video_attention_grid(received, (t, h, w))
    assert grid.shape == (1, t, h, w)
    assert grid[0, 0].flatten().tolist() == [1, 2, 3, 4, 5, 6]
    assert grid[0, 1].flatten().tolist() == [8, 9, 10, 11, 12, 13]


def test_strategy_drawn_per_sample_and_am_needs_attention():
    mask, which = mask_video_tokens(200, (2, 3, 3), ["rm", "bm"], 0.2, generator=torch.Generator().manual_seed(0))
    assert set(which.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="attention"):
        mask_video_tokens(8, (2, 3, 3), ["am"], 0.2)
    with pytest.raises(ValueError, match="unknown"):
        mask_video_tokens(8, (2, 3, 3), ["xx"], 0.2)
    assert num_masked((4, 7, 7), 0.0) == 0


def test_apply_video_mask_zeroes_exactly_the_masked_patches():
    video = torch.ones(2, 3, 3, 64, 96)
    token_mask = torch.zeros(2, 3, 2, 3, dtype=torch.bool)
    token_mask[0, 1, 1, 2] = True
    out = apply_video_mask(video, token_mask)
    assert out[0, 1, :, 32:64, 64:96].abs().sum() == 0
    assert out.sum() == video.sum() - 3 * 32 * 32
    assert video.sum() == 2 * 3 * 3 * 64 * 96  # input untouched
