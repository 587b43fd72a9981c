"""`hog`: histograms of oriented gradients computed in torch, batched, on the clip's device.

`hog_descriptor` reproduces `skimage.feature.hog(image, orientations, pixels_per_cell=(c, c),
cells_per_block=(b, b), block_norm=..., feature_vector=False, channel_axis=-1 or None)`:
centred differences (zero on the border rows/columns), per pixel the colour channel with the largest
gradient magnitude, unsigned orientation in [0, 180) hard-assigned to `orientations` equal bins,
magnitudes averaged per cell (pixels past the last whole cell are ignored), and overlapping
b x b-cell blocks normalised (`L2-Hys` by default: L2, clip at 0.2, L2 again, eps 1e-5).
Everything is tensor ops: no Python loop over pixels, cells, blocks or frames.

Target layout (decided here; VIOLETv2's paper intends HOG *features*, the official code regressed
skimage's HOG visualisation image instead):
- `layout="dense"` (default, kind `dense`): each pixel carries the `orientations` values of the cell it
  lies in. A cell belongs to up to b*b overlapping blocks, each giving it a differently normalised copy
  of its histogram; the cell's value is the mean of those copies. Channels = orientations (9).
- `layout="feature"` (kind `feature`): per VT token, the concatenated cell values of the
  (patch/cell)^2 cells it covers (MaskFeat style; 4*4*9 = 144 channels at patch 32, cell 8) — the
  same numbers without the 64x pixel broadcast, so a much smaller head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from violet_ds.data.frames import to_unit_range
from violet_ds.registry import TARGETS

from .base import Target, TargetOutput, TargetSpec

# skimage.color.rgb2gray's luma weights
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)
BLOCK_NORMS = ("L1", "L1-sqrt", "L2", "L2-Hys")


def image_gradients(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred differences of `(N, C, H, W)` along rows and columns, zero on the border (skimage's rule)."""
    g_row = F.pad(images[:, :, 2:, :] - images[:, :, :-2, :], (0, 0, 1, 1))
    g_col = F.pad(images[:, :, :, 2:] - images[:, :, :, :-2], (1, 1, 0, 0))
    return g_row, g_col


def cell_histograms(images: torch.Tensor, orientations: int = 9, cell: int = 8) -> torch.Tensor:
    """Per-cell orientation histograms `(N, orientations, H//cell, W//cell)` of `(N, C, H, W)` images.

    With C > 1, each pixel uses the channel of largest gradient magnitude (first one on ties).
    """
    n, channels, height, width = images.shape
    rows, cols = height // cell, width // cell
    if rows < 1 or cols < 1:
        raise ValueError(f"image {height}x{width} is smaller than one {cell}x{cell} cell")
    g_row, g_col = image_gradients(images)
    magnitude = torch.hypot(g_row, g_col)
    if channels > 1:
        strongest = magnitude.argmax(dim=1, keepdim=True)
        g_row = g_row.gather(1, strongest)
        g_col = g_col.gather(1, strongest)
        magnitude = magnitude.gather(1, strongest)
    # only whole cells count; crop before the (cheap) angle computation
    g_row = g_row[:, :, : rows * cell, : cols * cell]
    g_col = g_col[:, :, : rows * cell, : cols * cell]
    magnitude = magnitude[:, :, : rows * cell, : cols * cell]
    angle = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
    # skimage compares against bin edges held as C floats: same edges, same comparisons (x >= edge)
    edges = (torch.arange(1, orientations, dtype=torch.float64) * (180.0 / orientations)).float()
    bins = torch.bucketize(angle, edges.to(device=angle.device, dtype=angle.dtype), right=True)
    hist = torch.zeros(n, orientations, rows * cell, cols * cell, dtype=magnitude.dtype, device=magnitude.device)
    hist.scatter_(1, bins, magnitude)
    return hist.view(n, orientations, rows, cell, cols, cell).sum(dim=(3, 5)) / float(cell * cell)


def normalize_blocks(cells: torch.Tensor, block: int = 2, method: str = "L2-Hys", eps: float = 1e-5) -> torch.Tensor:
    """Cell histograms `(N, O, R, C)` -> normalised overlapping blocks `(N, R-b+1, C-b+1, b, b, O)`."""
    if method not in BLOCK_NORMS:
        raise ValueError(f"unknown block_norm {method!r}; one of {BLOCK_NORMS}")
    _, _, rows, cols = cells.shape
    if rows < block or cols < block:
        raise ValueError(f"{rows}x{cols} cells cannot hold a {block}x{block} block")
    # (N, O, R', C', b, b) -> (N, R', C', b, b, O)
    blocks = cells.unfold(2, block, 1).unfold(3, block, 1).permute(0, 2, 3, 4, 5, 1)
    dims = (3, 4, 5)
    if method == "L1":
        return blocks / (blocks.abs().sum(dim=dims, keepdim=True) + eps)
    if method == "L1-sqrt":
        return torch.sqrt(blocks / (blocks.abs().sum(dim=dims, keepdim=True) + eps))
    out = blocks / torch.sqrt(blocks.square().sum(dim=dims, keepdim=True) + eps ** 2)
    if method == "L2-Hys":
        out = out.clamp(max=0.2)
        out = out / torch.sqrt(out.square().sum(dim=dims, keepdim=True) + eps ** 2)
    return out


def hog_descriptor(images: torch.Tensor, orientations: int = 9, cell: int = 8, block: int = 2,
                   block_norm: str = "L2-Hys", transform_sqrt: bool = False) -> torch.Tensor:
    """skimage-compatible HOG of `(N, C, H, W)` -> `(N, blocks_r, blocks_c, b, b, orientations)`."""
    if transform_sqrt:
        images = images.clamp(min=0).sqrt()
    return normalize_blocks(cell_histograms(images, orientations, cell), block, block_norm)


def blocks_to_cells(blocks: torch.Tensor) -> torch.Tensor:
    """Normalised blocks `(N, R', C', b, b, O)` -> per-cell mean of its copies `(N, O, R'+b-1, C'+b-1)`."""
    n, block_rows, block_cols, block, _, orientations = blocks.shape
    rows, cols = block_rows + block - 1, block_cols + block - 1
    total = blocks.new_zeros(n, rows, cols, orientations)
    count = blocks.new_zeros(1, rows, cols, 1)
    # b*b shifted adds (4 for 2x2 blocks): every block adds its (i, j) cell to cell (r+i, c+j)
    for i in range(block):
        for j in range(block):
            total[:, i:i + block_rows, j:j + block_cols] += blocks[:, :, :, i, j]
            count[:, i:i + block_rows, j:j + block_cols] += 1
    return (total / count).permute(0, 3, 1, 2)


@TARGETS.register("hog")
class HOGTarget(Target):
    """HOG of each frame (see the module docstring for the layouts)."""

    name = "hog"

    def __init__(self, orientations: int = 9, cell: int = 8, block: int = 2, block_norm: str = "L2-Hys",
                 color: str = "max", layout: str = "dense", transform_sqrt: bool = False, loss: str = "l1",
                 scale: float = 1.0, quantize: bool = True, patch: int = 32):
        super().__init__(patch)
        if color not in ("max", "gray"):
            raise ValueError(f"hog color must be 'max' (skimage's channel_axis=-1) or 'gray', got {color!r}")
        if layout not in ("dense", "feature"):
            raise ValueError(f"hog layout must be 'dense' or 'feature', got {layout!r}")
        if patch % cell:
            raise ValueError(f"the VT patch {patch} must be a whole number of {cell}-pixel cells")
        if block_norm not in BLOCK_NORMS:
            raise ValueError(f"unknown block_norm {block_norm!r}; one of {BLOCK_NORMS}")
        self.orientations, self.cell, self.block = orientations, cell, block
        self.block_norm, self.color, self.layout = block_norm, color, layout
        self.transform_sqrt, self.scale, self.quantize = transform_sqrt, scale, quantize
        if layout == "dense":
            self.spec = TargetSpec("dense", orientations, loss)
        else:
            self.spec = TargetSpec("feature", orientations * (patch // cell) ** 2, loss)

    def cells(self, video: torch.Tensor) -> torch.Tensor:
        """Per-cell block-normalised histograms `(B*T, O, H/cell, W/cell)` of a normalised clip."""
        b, t, _, height, width = video.shape
        # float32 at least: orientation binning in bf16 would move pixels across bin edges
        frames = to_unit_range(video.reshape(b * t, 3, height, width).float())
        if self.quantize:
            # Back onto the 8-bit levels the JPEG frames had: gradients become exact integers, so
            # equal-magnitude colour channels tie exactly (skimage picks the first) instead of being
            # decided by the rounding noise of normalisation, which flips orientations of ~5% of cells.
            frames = (frames * 255.0).round_().clamp_(0.0, 255.0)
        if self.color == "gray":
            weights = torch.tensor(GRAY_WEIGHTS, dtype=frames.dtype, device=frames.device).view(1, 3, 1, 1)
            frames = (frames * weights).sum(dim=1, keepdim=True)
        blocks = hog_descriptor(frames, self.orientations, self.cell, self.block, self.block_norm,
                                self.transform_sqrt)
        # frame sides are multiples of the patch, hence of the cell: the cells tile the frame exactly
        return blocks_to_cells(blocks) * self.scale

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        b, t, _, height, width = video.shape
        cells = self.cells(video)
        out_dtype = video.dtype
        if self.layout == "dense":
            dense = cells.repeat_interleave(self.cell, dim=2).repeat_interleave(self.cell, dim=3)
            return TargetOutput(dense.reshape(b, t, self.orientations, height, width).to(out_dtype))
        per = self.patch // self.cell
        h, w = height // self.patch, width // self.patch
        # (N, O, h, per, w, per) -> (N, h, w, per, per, O): one row of (per*per*O) cell values per token
        tokens = cells.reshape(b * t, self.orientations, h, per, w, per).permute(0, 2, 4, 3, 5, 1)
        return TargetOutput(tokens.reshape(b, t, h, w, -1).to(out_dtype))
