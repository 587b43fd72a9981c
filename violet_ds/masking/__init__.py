"""Masking for every pretraining objective; the public functions are re-exported here.

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

# NOTE: text.py (MLM) and visual.py (VIOLET rm/bm/am) are re-exported here once they exist.

__all__ = [
    "block_length_limits",
    "block_mask_3d",
    "blocks_for_ratio",
    "expected_block_ratio",
    "iid_mask_3d",
    "mask_vq_tokens",
    "measure_block_ratio",
]
