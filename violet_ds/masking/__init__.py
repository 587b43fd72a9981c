"""Masking for every pretraining objective; the public functions are re-exported here.

- ``text``: MLM masking of text ids (special ids always from the tokenizer);
- ``visual``: VIOLET masked visual modelling on the VT token grid (rm / bm / am);
- ``blocks3d``: VIMPAC 3D block masking and i.i.d. masking on VQ-token grids.
"""

from .blocks3d import (
    block_length_limits,
    block_mask_3d,
    blocks_for_ratio,
    expected_block_ratio,
    iid_mask_3d,
    mask_vq_tokens,
    measure_block_ratio,
)
from .text import IGNORE_INDEX, mask_text, maskable_positions
from .visual import (
    STRATEGIES,
    apply_video_mask,
    attended_mask,
    blockwise_mask,
    mask_video_tokens,
    needs_attention,
    num_masked,
    random_mask,
    video_attention_grid,
)

__all__ = [
    # VIMPAC
    "block_length_limits",
    "block_mask_3d",
    "blocks_for_ratio",
    "expected_block_ratio",
    "iid_mask_3d",
    "mask_vq_tokens",
    "measure_block_ratio",
    # MLM
    "IGNORE_INDEX",
    "mask_text",
    "maskable_positions",
    # VIOLET MVM
    "STRATEGIES",
    "apply_video_mask",
    "attended_mask",
    "blockwise_mask",
    "mask_video_tokens",
    "needs_attention",
    "num_masked",
    "random_mask",
    "video_attention_grid",
]
