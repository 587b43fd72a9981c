"""Video Swin Transformer (3D shifted-window attention) for the VIOLET video encoder.

Layout is channels-last throughout, `(B, T, H, W, C)`, so window partitioning is a pair of
reshapes/permutes (for shifted windows, the cyclic shift and the partition are one gather) and attention
runs through `torch.nn.functional.scaled_dot_product_attention` with the relative-position bias (plus the
shifted-window mask) passed as an additive `attn_mask`.
There are no Python loops over windows or frames.

Parameter and buffer names follow the official Video Swin checkpoints (`patch_embed`, `layers.i.blocks.j`,
`layers.i.downsample`, `norm`), so a Kinetics checkpoint loads after stripping its `backbone.` prefix.
`inflate_2d_swin_state_dict` turns a timm 2D Swin state dict into this layout.

The patch embedding follows VIOLET: a (2, 4, 4) kernel with temporal stride 1 over the clip padded with
one zero frame at the end, so there is no temporal downsampling (output frame t mixes input frames t, t+1).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from timm.layers import Mlp, trunc_normal_

from violet_ds.config import check_at_least, check_field_types
from violet_ds.weights import KeyReport, load_checked, strip_prefix

from .checkpoint_io import read_weights_file

Size3 = Tuple[int, int, int]
log = logging.getLogger(__name__)


@dataclass
class VideoSwinConfig:
    """Hyperparameters of one Video Swin variant."""

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    patch_size: Size3 = (2, 4, 4)
    # temporal stride of the patch embedding; VIOLET uses 1 (no temporal downsampling)
    temporal_stride: int = 1
    window_size: Size3 = (8, 7, 7)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    in_chans: int = 3
    # window attention kernel: "sdpa" (bias + shift mask as a float attn_mask: the memory-efficient
    # kernel on CUDA), "flex" (FlexAttention: bias as score_mod, shift mask as a block mask; compiled on
    # CUDA; forward-only on CPU), "explicit" (baddbmm with the bias as its input, softmax, bmm: what the
    # CPU runs, where SDPA falls back to its math kernel for a mask that needs a gradient), or "auto"
    # (= explicit on CPU, sdpa elsewhere: flex measured no faster on an H200, see gpu_check)
    attention: str = "auto"
    # activation checkpointing of every block (`set_grad_checkpointing`)
    grad_checkpointing: bool = False
    # keep what the encoder saves for backward in CPU memory (`set_grad_checkpointing(offload=True)`)
    offload_activations: bool = False

    def __post_init__(self) -> None:
        # VIOLET's `swin_overrides` may come from a file (a model directory's config.json): named by key
        check_field_types(self, "swin_overrides")
        check_at_least(self, {"embed_dim": 1, "temporal_stride": 1, "in_chans": 1, "mlp_ratio": 0, "drop_rate": 0,
                              "attn_drop_rate": 0, "drop_path_rate": 0}, "swin_overrides")

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stride(self) -> int:
        """Spatial stride from pixels to output tokens."""
        return int(self.patch_size[1] * 2 ** (len(self.depths) - 1))


SWIN_VARIANTS: Dict[str, dict] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def _effective_window(grid: Size3, window: Size3, shift: Size3) -> Tuple[Size3, Size3]:
    """Clip the window to the token grid; no shift along an axis the window already covers."""
    use_window, use_shift = list(window), list(shift)
    for axis in range(3):
        if grid[axis] <= window[axis]:
            use_window[axis] = grid[axis]
            use_shift[axis] = 0
    return tuple(use_window), tuple(use_shift)


def window_partition(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """(B, T, H, W, C) with T, H, W multiples of the window -> (B * num_windows, prod(window), C)."""
    b, t, h, w, c = x.shape
    wt, wh, ww = window
    x = x.view(b, t // wt, wt, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, wt * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Size3, b: int, t: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    wt, wh, ww = window
    c = windows.shape[-1]
    x = windows.view(b, t // wt, h // wh, w // ww, wt, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, t, h, w, c)


class _PermuteTokens(torch.autograd.Function):
    """`x.index_select(1, order)` for a permutation `order`, with the backward a gather by its inverse (the
    default backward of index_select is a scatter-add into zeros)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.inverse = inverse  # a constant index, not an activation: kept off the saved-tensor hooks
        return x.index_select(1, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(1, ctx.inverse), None, None


def shifted_window_order(grid: Size3, window: Size3, shift: Size3, device: torch.device
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse) over the flattened grid: position k of the cyclically shifted, window-partitioned token
    sequence holds grid token `order[k]`, and `inverse` undoes it. One gather then replaces `torch.roll`
    followed by :func:`window_partition` (two copies of the activations, forward and backward)."""
    tokens = torch.arange(grid[0] * grid[1] * grid[2], device=device).view(1, *grid, 1)
    order = window_partition(torch.roll(tokens, shifts=tuple(-s for s in shift), dims=(1, 2, 3)), window).flatten()
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=device)
    return order, inverse


def relative_position_index(window: Size3) -> torch.Tensor:
    """(N, N) index into a ((2wt-1)(2wh-1)(2ww-1), heads) bias table for a window of N tokens."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    wt, wh, ww = window
    rel[..., 0] += wt - 1
    rel[..., 1] += wh - 1
    rel[..., 2] += ww - 1
    return rel[..., 0] * (2 * wh - 1) * (2 * ww - 1) + rel[..., 1] * (2 * ww - 1) + rel[..., 2]


def shifted_window_regions(grid: Size3, window: Size3, shift: Size3, device: torch.device) -> torch.Tensor:
    """(num_windows, N) region label of each token after the cyclic roll; tokens attend within a label."""
    region = torch.zeros((1, *grid, 1), device=device)
    label = 0
    slices = [(slice(0, -window[a]), slice(-window[a], -shift[a]), slice(-shift[a], None)) for a in range(3)]
    for st in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                region[:, st, sh, sw, :] = label
                label += 1
    return window_partition(region, window).squeeze(-1).long()


def shifted_window_mask(regions: torch.Tensor) -> torch.Tensor:
    """(num_windows, N, N) additive mask of the region labels `shifted_window_regions` gives: -inf-like between
    tokens from different regions after the roll."""
    diff = regions[:, None, :] - regions[:, :, None]
    # a large finite value instead of -inf keeps half-precision softmax free of NaN
    return torch.zeros(diff.shape, device=regions.device).masked_fill_(diff != 0, -100.0)


def explicit_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out, for q, k, v (B, G, N, d) and mask (1, G, N, N).

    Equal to `scaled_dot_product_attention(q, k, v, attn_mask=mask)` (to float rounding) in fewer passes
    than SDPA's math kernel (the CPU's choice when the mask needs a gradient): the scale and the mask
    ride on one `baddbmm` (the mask is its input), and no masking-safe softmax bookkeeping is done
    (the masks here are finite). Its backward sums the mask's gradient over B, as SDPA's does.
    """
    b, g, n, d = q.shape
    scale = d ** -0.5
    if b == 1:
        base = mask.reshape(g, n, n)
    else:
        base = mask.expand(b, g, n, n).reshape(b * g, n, n)
    scores = torch.baddbmm(base, q.reshape(b * g, n, d), k.reshape(b * g, n, d).transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.bmm(probs, v.reshape(b * g, n, d)).view(b, g, n, d)


def _flex_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                           index: torch.Tensor, regions: Optional[torch.Tensor], heads: int) -> torch.Tensor:
    """Window attention through FlexAttention.

    q, k, v: (B, G, N, d) with G = heads, or G = num_windows * heads (window-major) when `regions`
    (num_windows, N) is given. The relative-position bias is read from `table` inside `score_mod`
    (so the table gets its gradient there, and no (heads, N, N) bias is materialised); the
    shifted-window rule becomes a block mask. Masked pairs get exactly zero weight where the SDPA path
    adds -100 (a difference of e^-100 relative).
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[index[q_idx, kv_idx], h % heads].to(score.dtype)

    block_mask = None
    if regions is not None:
        def mask_mod(b, h, q_idx, kv_idx):
            window = h // heads
            return regions[window, q_idx] == regions[window, kv_idx]

        n = q.shape[2]
        block_mask = create_block_mask(mask_mod, None, q.shape[1], n, n, device=q.device)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)


FLEX_GRAPH_LIMIT = 64
"""Graphs the compiled FlexAttention may hold: one per stage geometry (heads, window, shifted or not) and batch size"""


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    """The compiled FlexAttention function, built at its first use (compiling is lazy: nothing runs here)."""
    return torch.compile(_flex_window_attention, dynamic=False, fullgraph=True)


def _flex_call(*args):
    """Compiled FlexAttention on CUDA (its fused kernel); eager elsewhere (forward-only reference), and inside a
    compiled block (`model.compile`), whose graph then holds it."""
    if not args[0].is_cuda or torch.compiler.is_compiling():
        return _flex_window_attention(*args)
    # violet-v2 has 7 window geometries per batch size, torch's default limit per function is 8: raised for this
    # call only, so that no other compiled function of the process gets more recompiles than it asked for
    with torch._dynamo.config.patch(recompile_limit=FLEX_GRAPH_LIMIT):
        return _compiled_flex_attention()(*args)


class PatchEmbed3D(nn.Module):
    """Conv3d patch embedding with VIOLET's temporal padding, output channels-last (B, T, h, w, C)."""

    def __init__(self, cfg: VideoSwinConfig):
        super().__init__()
        self.patch_size = tuple(cfg.patch_size)
        self.temporal_stride = cfg.temporal_stride
        stride = (cfg.temporal_stride, cfg.patch_size[1], cfg.patch_size[2])
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=self.patch_size, stride=stride)
        self.norm = nn.LayerNorm(cfg.embed_dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        # video: (B, C, T, H, W)
        _, _, t, h, w = video.shape
        pt, ph, pw = self.patch_size
        if self.temporal_stride == 1:
            pad_t = pt - 1
        else:
            pad_t = (-t) % self.temporal_stride + max(pt - self.temporal_stride, 0)
        pad_h, pad_w = (-h) % ph, (-w) % pw
        if pad_t or pad_h or pad_w:
            video = F.pad(video, (0, pad_w, 0, pad_h, 0, pad_t))
        x = self.proj(video).permute(0, 2, 3, 4, 1)
        return self.norm(x)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3D windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: Size3, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.dim = dim
        self.window = tuple(window)
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        table_size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        # persistent (official checkpoints hold it); clipped windows index a subset of it
        self.register_buffer("relative_position_index", relative_position_index(self.window), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._index_cache: Dict[Tuple[Size3, torch.device], torch.Tensor] = {}
        self.attention = "auto"  # set by the backbone from VideoSwinConfig.attention

    def _index_for(self, window: Size3) -> torch.Tensor:
        full_index = self.relative_position_index
        if window == self.window:
            return full_index
        key = (window, full_index.device)
        cached = self._index_cache.get(key)
        if cached is None:
            # offsets inside a smaller window are a subset of the full window's offsets, so the
            # full table serves it: pick the rows/columns of the positions inside the clipped window
            pos = torch.stack(torch.meshgrid(*(torch.arange(s) for s in window), indexing="ij")).flatten(1)
            flat = (pos[0] * self.window[1] + pos[1]) * self.window[2] + pos[2]
            flat = flat.to(full_index.device)
            cached = full_index[flat][:, flat].contiguous()
            self._index_cache[key] = cached
        return cached

    def bias_index(self, window: Size3) -> "WindowIndex":
        """The relative-position indices of an (effective) window (computed here; a stage computes them once for
        all its blocks and hands them over, so that no compiled block touches a cache)."""
        return WindowIndex.of(self._index_for(window), self.num_heads)

    def relative_bias(self, window: Size3, index: Optional["WindowIndex"] = None) -> torch.Tensor:
        """(heads, N, N) bias for an (effective) window: one gather from the flat table, contiguous as SDPA's
        memory-efficient CUDA kernel needs (no transposed copy of the table); index_select's backward is an
        index_add, several times cheaper on CPU than the sorted index_put of `table[index]`."""
        index = index if index is not None else self.bias_index(window)
        n = index.index.shape[0]
        return self.relative_position_bias_table.reshape(-1).index_select(0, index.flat).view(-1, n, n)

    def uses_flex(self, device: torch.device) -> bool:
        # only when asked: on an H200 (torch 2.11) the compiled FlexAttention was between 4% faster and 11% slower
        # than SDPA's memory-efficient kernel on the backbone alone, and the full violet-v2 bf16 step at batch 16
        # took 384 ms with it against 311 ms with SDPA (docs/benchmarks.md). FlexAttention has no CPU backward,
        # so CPU training falls back to the default path
        return self.attention == "flex" and (device.type == "cuda" or not torch.is_grad_enabled())

    def uses_explicit(self, device: torch.device) -> bool:
        return self.attention == "explicit" or (self.attention == "auto" and device.type == "cpu")

    def forward(self, windows: torch.Tensor, window: Size3, shift: Optional["ShiftGeometry"],
                index: Optional["WindowIndex"] = None) -> torch.Tensor:
        # windows: (B * nW, N, C) ordered batch-major, as window_partition returns them
        index = index if index is not None else self.bias_index(window)
        bw, n, c = windows.shape
        heads = self.num_heads
        # the Linear layers on (tokens, C): a plain addmm, where on 3-D input torch flattens and unflattens around it
        # (two views more in forward and in backward, same result)
        qkv = self.qkv(windows.reshape(bw * n, c))
        if shift is None:
            q, k, v = qkv.view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            # fold windows into the head axis: (B, nW*heads, N, d), so the per-window mask is shared
            # by the batch instead of materialised per sample; q, k and v in one copy (not one each)
            nw = shift.regions.shape[0]
            qkv = qkv.view(bw // nw, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
            q, k, v = qkv.reshape(3, bw // nw, nw * heads, n, c // heads).unbind(0)
        if self.uses_flex(q.device) and not (self.training and self.attn_drop > 0):
            out = _flex_call(q, k, v, self.relative_position_bias_table, index.index,
                             None if shift is None else shift.regions, heads)
        else:
            bias = self.relative_bias(window, index).to(q.dtype)
            if shift is None:
                mask = bias.unsqueeze(0)
            else:
                mask = (bias.unsqueeze(0) + shift.mask.to(q.dtype).unsqueeze(1)).reshape(1, -1, n, n)
            dropout_p = self.attn_drop if self.training else 0.0
            if self.uses_explicit(q.device):
                out = explicit_window_attention(q, k, v, mask, dropout_p)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.reshape(bw, heads, n, -1).transpose(1, 2).reshape(bw * n, c)
        return self.proj_drop(self.proj(out)).view(bw, n, c)


@dataclass
class WindowIndex:
    """Relative-position indices of one (effective) window: `index` (N, N) into the (offsets, heads) bias table,
    and `flat` (heads * N * N) into the flattened table, head-major (one gather gives the (heads, N, N) bias)."""

    index: torch.Tensor
    flat: torch.Tensor

    @classmethod
    def of(cls, index: torch.Tensor, heads: int) -> "WindowIndex":
        heads_offset = torch.arange(heads, device=index.device).view(-1, 1, 1)
        return cls(index, (index.unsqueeze(0) * heads + heads_offset).reshape(-1))


@dataclass
class ShiftGeometry:
    """What shifted-window attention needs for one padded grid: region labels (nW, N), the
    additive mask (nW, N, N) built from them, and the token permutation of the shifted partition
    (:func:`shifted_window_order`) with its inverse."""

    regions: torch.Tensor
    mask: torch.Tensor
    order: torch.Tensor
    inverse: torch.Tensor


class DropPath(nn.Module):
    """Stochastic depth: the residual branch of a sample is dropped with probability `rate` in training, the kept
    ones scaled by 1 / (1 - rate). The keep probability is a 0-dim buffer, not a Python float: dynamo guards on a
    float attribute's value, so blocks with different rates (they grow with depth) would each compile their own
    graph, where with a tensor every block of a stage shares one (`model.compile`)."""

    def __init__(self, rate: float):
        super().__init__()
        # (a rate of 1 keeps 1e-6 of the samples: timm's would divide by zero there)
        self.register_buffer("keep", torch.tensor(max(1.0 - rate, 1e-6)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(self.keep)
        return x * mask.div_(self.keep)


class SwinBlock3D(nn.Module):
    """Pre-norm (shifted) window attention + MLP with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, window: Size3, shift: Size3, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, window, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def _attention(self, x: torch.Tensor, window: Size3, shift: Size3, shift_mask: Optional[ShiftGeometry],
                   index: Optional[WindowIndex]) -> torch.Tensor:
        b, t, h, w, c = x.shape
        x = self.norm1(x)
        pad = [(-s) % ws for s, ws in zip((t, h, w), window)]
        if any(pad):
            # pad after the norm, as the official model does, so pads are exact zeros
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        tp, hp, wp = x.shape[1:4]
        if any(shift):
            # the cyclic shift and the partition in one gather (and its inverse after attention)
            n = window[0] * window[1] * window[2]
            windows = _PermuteTokens.apply(x.reshape(b, -1, c), shift_mask.order, shift_mask.inverse)
            windows = self.attn(windows.view(-1, n, c), window, shift_mask, index)
            x = _PermuteTokens.apply(windows.view(b, -1, c), shift_mask.inverse, shift_mask.order)
            x = x.view(b, tp, hp, wp, c)
        else:
            windows = self.attn(window_partition(x, window), window, None, index)
            x = window_reverse(windows, window, b, tp, hp, wp)
        if any(pad):
            x = x[:, :t, :h, :w].contiguous()
        return x

    def forward(self, x: torch.Tensor, window: Size3, shift: Size3, shift_mask: Optional[ShiftGeometry],
                index: Optional[WindowIndex] = None) -> torch.Tensor:
        x = x + self.drop_path(self._attention(x, window, shift, shift_mask, index))
        # the MLP on (tokens, C), as the attention's Linear layers
        return x + self.drop_path(self.mlp(self.norm2(x).view(-1, x.shape[-1])).view(x.shape))


class PatchMerging(nn.Module):
    """2x2 spatial merge: concat of (even,even), (odd,even), (even,odd), (odd,odd) -> LN -> Linear(4C, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (.., h/2, 2, w/2, 2, C) -> (.., h/2, w/2, [w-offset, h-offset], C): the official channel order
        x = x.view(b, t, h // 2, 2, w // 2, 2, c).permute(0, 1, 2, 4, 5, 3, 6).reshape(b, t, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Blocks of one resolution (alternating regular/shifted windows), then an optional merge."""

    def __init__(self, dim: int, depth: int, num_heads: int, window: Size3, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: Sequence[float], downsample: bool):
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(s // 2 for s in window)
        self.blocks = nn.ModuleList([
            SwinBlock3D(dim, num_heads, window, (0, 0, 0) if i % 2 == 0 else self.shift, mlp_ratio,
                        qkv_bias, drop, attn_drop, drop_path[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None
        self.grad_checkpointing = False
        self._mask_cache: Dict[tuple, ShiftGeometry] = {}
        self._index_cache: Dict[tuple, WindowIndex] = {}

    def _window_index(self, window: Size3, device: torch.device) -> WindowIndex:
        """The bias indices of the effective window, shared by every block of the stage (same window, same heads)."""
        key = (window, device)
        index = self._index_cache.get(key)
        if index is None:
            index = self._index_cache[key] = self.blocks[0].attn.bias_index(window)
        return index

    def _shift_mask(self, padded: Size3, window: Size3, shift: Size3, device: torch.device) -> ShiftGeometry:
        key = (padded, window, shift, device)
        geometry = self._mask_cache.get(key)
        if geometry is None:
            regions = shifted_window_regions(padded, window, shift, device)
            geometry = ShiftGeometry(regions, shifted_window_mask(regions),
                                     *shifted_window_order(padded, window, shift, device))
            self._mask_cache[key] = geometry
        return geometry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = tuple(x.shape[1:4])
        window, shift = _effective_window(grid, self.window, self.shift)
        shift_mask = None
        if any(shift) and len(self.blocks) > 1:
            padded = tuple(g + (-g) % ws for g, ws in zip(grid, window))
            shift_mask = self._shift_mask(padded, window, shift, x.device)
        index = self._window_index(window, x.device)
        for i, block in enumerate(self.blocks):
            block_shift = shift if i % 2 == 1 else (0, 0, 0)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, window, block_shift, shift_mask, index, use_reentrant=False)
            else:
                x = block(x, window, block_shift, shift_mask, index)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class OffloadSavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Keep the tensors a module saves for backward in CPU memory (pinned on CUDA) until backward needs them.

    Like `torch.autograd.graph.save_on_cpu`, except that tensors sharing storage with the module's own
    parameters (weights saved by linear/conv, or views of them) stay where they are: they are resident
    anyway, so copying them out and back would only cost transfer time. With non-reentrant activation
    checkpointing, the only saved tensors left are the checkpointed blocks' inputs (and those of the
    non-checkpointed glue ops), so this moves exactly what checkpointing keeps alive off the accelerator.
    Tensors already on the CPU are left alone unless `include_cpu` (used by tests to exercise the path).
    """

    def __init__(self, module: nn.Module, include_cpu: bool = False):
        param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.offloaded_bytes = 0

        def pack(tensor: torch.Tensor):
            if ((tensor.device.type == "cpu" and not include_cpu) or tensor.is_sparse
                    or tensor.untyped_storage().data_ptr() in param_storages):
                return tensor
            pin = tensor.device.type == "cuda"
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin)
            packed.copy_(tensor)
            self.offloaded_bytes += packed.numel() * packed.element_size()
            return (tensor.device, pin, packed)

        def unpack(packed):
            if isinstance(packed, tuple):
                device, pin, tensor = packed
                return tensor.to(device, non_blocking=pin)
            return packed

        super().__init__(pack, unpack)


class VideoSwinTransformer3D(nn.Module):
    """Video Swin backbone: `(B, C, T, H, W)` float video -> `(B, T', H/stride, W/stride, num_features)`."""

    def __init__(self, cfg: Optional[VideoSwinConfig] = None, **overrides):
        super().__init__()
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(VideoSwinConfig)})
        if unknown:
            raise TypeError(f"VideoSwinConfig has no field {unknown[0]!r}")
        # the caller's configuration is left as it is: this module keeps its own copy
        cfg = dataclasses.replace(cfg or VideoSwinConfig(), **overrides)
        if len(cfg.depths) != len(cfg.num_heads):
            raise ValueError(f"depths {tuple(cfg.depths)} and num_heads {tuple(cfg.num_heads)} differ in length")
        self.cfg = cfg
        self.patch_embed = PatchEmbed3D(cfg)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        total_depth = sum(cfg.depths)
        # plain Python: the model may be built under torch.device('meta')
        rates = [cfg.drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]
        stages, start = [], 0
        for i, (depth, heads) in enumerate(zip(cfg.depths, cfg.num_heads)):
            stages.append(SwinStage(
                dim=cfg.embed_dim * 2 ** i, depth=depth, num_heads=heads, window=tuple(cfg.window_size),
                mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate, drop_path=rates[start:start + depth],
                downsample=i < len(cfg.depths) - 1))
            start += depth
        self.layers = nn.ModuleList(stages)
        self.set_attention(cfg.attention)
        self.num_features = cfg.num_features
        self.norm = nn.LayerNorm(self.num_features)
        self.apply(self._init_weights)
        self.set_grad_checkpointing(cfg.grad_checkpointing, offload=cfg.offload_activations)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_attention(self, kind: str) -> None:
        """Window-attention kernel for every block: "auto", "sdpa", "flex" or "explicit" (see VideoSwinConfig)."""
        if kind not in ("auto", "sdpa", "flex", "explicit"):
            raise ValueError(f"attention must be auto, sdpa, flex or explicit, got {kind!r}")
        self.cfg.attention = kind
        for module in self.modules():
            if isinstance(module, WindowAttention3D):
                module.attention = kind

    def set_grad_checkpointing(self, enable: bool = True, offload: bool = False) -> None:
        """Per-block activation checkpointing (`use_reentrant=False`).

        `offload` also moves what the encoder saves for backward (the checkpointed block inputs, or all
        activations without checkpointing) to pinned CPU memory with `OffloadSavedActivations` (torch's
        saved-tensor hooks, as `save_on_cpu`, minus the parameters). It was chosen over fairscale's
        `checkpoint_wrapper(offload_to_cpu=True)` (the official code's): same gradients, composes with
        non-reentrant checkpointing, no reentrant autograd function, no extra dependency;
        `tools/measure_violet_step.py` compares the two.
        """
        for stage in self.layers:
            stage.grad_checkpointing = enable
        self.offload = offload

    def output_grid(self, t: int, h: int, w: int) -> Size3:
        """Token grid `(T', h', w')` produced for an input of `t` frames at `h` x `w` pixels."""
        cfg = self.cfg
        if cfg.temporal_stride == 1:
            t_out = t
        else:
            t_out = -(-t // cfg.temporal_stride)
        h_out = -(-h // cfg.patch_size[1])
        w_out = -(-w // cfg.patch_size[2])
        for _ in range(len(cfg.depths) - 1):
            h_out, w_out = -(-h_out // 2), -(-w_out // 2)
        return t_out, h_out, w_out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        offload = self.offload and torch.is_grad_enabled()
        with OffloadSavedActivations(self) if offload else contextlib.nullcontext():
            x = self.pos_drop(self.patch_embed(video))
            for stage in self.layers:
                x = stage(x)
            return self.norm(x)


def build_video_swin(variant: str = "small", **overrides) -> VideoSwinTransformer3D:
    """A Video Swin of a named size (`tiny`, `small`, `base`) with field overrides."""
    if variant not in SWIN_VARIANTS:
        raise KeyError(f"unknown Video Swin variant {variant!r}; known: {', '.join(SWIN_VARIANTS)}")
    cfg = VideoSwinConfig(**{**SWIN_VARIANTS[variant], **overrides})
    return VideoSwinTransformer3D(cfg)


# ----------------------------------------------------------------------------------- weight loading

def _resize_bias_table_2d(table: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of a ((2w-1)^2, heads) 2D table to ((size)^2, heads)."""
    old = round(table.shape[0] ** 0.5)
    if old == size:
        return table
    grid = table.t().reshape(1, -1, old, old).float()
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
    return grid.reshape(-1, size * size).t().to(table.dtype)


def inflate_2d_swin_state_dict(state_dict_2d: Dict[str, torch.Tensor],
                               model: VideoSwinTransformer3D) -> Dict[str, torch.Tensor]:
    """Convert a 2D Swin state dict (timm's, or Microsoft's original layout) to this model's keys and shapes.

    - patch embedding (D, 3, ph, pw) is repeated over the kernel's time axis and divided by its length
      (a static video then gives the 2D response);
    - each ((2w-1)^2, heads) relative-position table is resized bicubically to this model's spatial
      window and repeated over the (2wt-1) temporal offsets;
    - timm keeps the patch merge at the start of stage i+1; here (and in Microsoft's layout) it ends stage i;
    - classifier head and index/mask buffers are dropped (buffers are rebuilt).
    Raises KeyError naming the keys that have no counterpart.
    """
    target = model.state_dict()
    window = model.cfg.window_size
    # timm (>= 0.9) merges patches at the start of stage i+1; Microsoft's original 2D checkpoints (and
    # this model) at the end of stage i, so only timm's layout needs its stage index moved
    timm_layout = not any(k.startswith("layers.0.downsample.") for k in state_dict_2d)
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict_2d.items():
        if key.startswith("head") or key.endswith(("relative_position_index", "attn_mask")):
            continue
        new_key = key
        parts = key.split(".")
        if timm_layout and parts[0] == "layers" and len(parts) > 2 and parts[2] == "downsample":
            new_key = ".".join(["layers", str(int(parts[1]) - 1)] + parts[2:])
        if new_key not in target:
            unknown.append(key)
            continue
        if new_key == "patch_embed.proj.weight":
            kt = target[new_key].shape[2]
            value = value.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
        elif new_key.endswith("relative_position_bias_table"):
            spatial = 2 * window[1] - 1
            if window[1] != window[2]:
                raise ValueError("inflation needs a square spatial window")
            value = _resize_bias_table_2d(value, spatial).repeat(2 * window[0] - 1, 1)
        if tuple(value.shape) != tuple(target[new_key].shape):
            raise ValueError(f"2D Swin key {key!r} -> {new_key!r}: shape {tuple(value.shape)} "
                             f"!= expected {tuple(target[new_key].shape)}")
        out[new_key] = value
    if unknown:
        raise KeyError(f"2D Swin keys with no Video Swin counterpart: {unknown}")
    # the index buffers are geometry, not weights: keep the model's own
    for key, value in target.items():
        if key.endswith("relative_position_index"):
            out[key] = value
    missing = sorted(set(target) - set(out))
    if missing:
        raise KeyError(f"2D Swin state dict lacks Video Swin keys: {missing}")
    return out


def load_video_swin_weights(model: VideoSwinTransformer3D, path: str) -> KeyReport:
    """Load official Video Swin (Kinetics, `backbone.` prefix or bare), timm 2D Swin, VIOLET-family
    (official or violet_ds) or our own weights, through `checkpoint_io.read_weights_file`.

    Returns the `weights.KeyReport`: `ignored` = the file's keys outside the backbone (a Kinetics `cls_head`, the
    rest of a VIOLET model), `unexpected` = backbone keys the model lacks (logged, not loaded); a missing weight
    or a shape that differs is an error naming the key (the relative-position index buffers are geometry: the
    model keeps its own).
    """
    state = read_weights_file(path, allow_unmatched=True).state
    outside_prefix: list = []
    for prefix in ("backbone.", "model.video_backbone."):
        if any(k.startswith(prefix) for k in state):
            # Kinetics checkpoints also carry `cls_head.*`, VIOLET ones the rest of the model: reported
            outside_prefix = sorted(k for k in state if not k.startswith(prefix))
            state = strip_prefix(state, prefix)
            break
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if "patch_embed.proj.weight" in state and state["patch_embed.proj.weight"].dim() == 4:
        state = inflate_2d_swin_state_dict(state, model)
    report = load_checked(model, state, f"{path}: Video Swin weights", allow_unexpected=True,
                          initialise=lambda key: key.endswith("relative_position_index"))
    report.ignored = outside_prefix
    if report.unexpected or outside_prefix:
        log.info("%s: %d keys not used by the video backbone: %s", path, len(report.unexpected) + len(outside_prefix),
                 (outside_prefix + report.unexpected)[:10])
    return report


__all__ = [
    "VideoSwinConfig", "VideoSwinTransformer3D", "build_video_swin", "inflate_2d_swin_state_dict",
    "load_video_swin_weights", "window_partition", "window_reverse", "relative_position_index",
    "shifted_window_mask", "shifted_window_regions", "explicit_window_attention",
    "SWIN_VARIANTS",
]
