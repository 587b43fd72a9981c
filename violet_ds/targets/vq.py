"""`vq`: DALL-E dVAE token ids (a classification over the 8192 codes per VT token).

`DalleEncoder` is the dVAE encoder of OpenAI's DALL-E, written here in torch after the published
architecture, with the official parameter names so the released weights load unchanged:

    blocks.input                      7x7 conv, 3 -> n_hid
    blocks.group_{1..4}.block_{k}     residual blocks (id_path: 1x1 conv when the width changes,
                                      res_path: relu/conv_1 3x3, relu/conv_2 3x3, relu/conv_3 3x3,
                                      relu/conv_4 1x1, bottleneck width out/4, scaled by 1/n_layers^2)
    blocks.group_{1..3}.pool          2x2 max pool (hence 8x downsampling)
    blocks.output.conv                relu + 1x1 conv to the vocabulary (8192 logits)

Convolutions hold their weights as `w`/`b` (the official layout), widths n_hid, 2n_hid, 4n_hid, 8n_hid.
Pixels in [0, 1] are squeezed into [eps, 1-eps] (eps = 0.1) before the encoder, as DALL-E does.

Weights: the official `encoder.pkl` is a *pickled module*; loading it would execute code, so it is
not supported. Convert it once, on a machine and with code you trust, by unpickling the module and
saving its `state_dict()` with `torch.save` (or safetensors); then pass that state dict (`.pt`/`.pth`
read with `weights_only=True`, or `.safetensors`). The architecture (n_hid, blocks per group, vocabulary)
is read off the state dict's shapes. Keys under `dalle.encoder.` or `encoder.` (VIOLETv2 pretraining
checkpoints) are accepted.

Layout: each frame is resized to `(8h, 8w)` for a `(h, w)` VT grid (56x56 at 224: VIOLET's setting)
so the encoder yields exactly one token per VT token. Without a checkpoint the target only reads
pre-extracted ids (`batch["vq_tokens"]`, see `base.target_from_batch`).

`violet-ds extract-vq` (`extract_vq`) runs the encoder over every stored frame of a frame TSV into
the VQ-token TSV that VIMPAC trains on (`violet_ds.data.vq_clips` reads it); `write_random_dvae`
saves a random encoder for demos and tests.
"""

from __future__ import annotations

import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from violet_ds.data.frames import VideoTransform, decode_frames, to_unit_range
from violet_ds.data.tsv import TSVFile, resolve_tsv_paths
from violet_ds.data.vq_clips import VQ_CODEBOOK_SIZE, VQTokenError, write_vq_tsv
from violet_ds.progress import progress as progress_bar
from violet_ds.registry import TARGETS
from violet_ds.weights import load_strict, read_state_dict, save_safetensors

from .base import Target, TargetOutput, TargetSpec, resize_frames

LOGIT_EPS = 0.1
DOWNSAMPLE = 8
GROUPS = 4


class DalleConv(nn.Module):
    """Conv2d with 'same' padding whose parameters are named `w`/`b` like the official dVAE's."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1.0 / (n_in * kernel * kernel) ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kernel - 1) // 2)


class DalleEncoderBlock(nn.Module):
    """Pre-activation bottleneck residual block; the residual is scaled by 1/n_layers^2 (DALL-E's init)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1.0 / n_layers ** 2
        self.id_path = DalleConv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", DalleConv(n_in, hidden, 3)),
            ("relu_2", nn.ReLU()), ("conv_2", DalleConv(hidden, hidden, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", DalleConv(hidden, hidden, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", DalleConv(hidden, n_out, 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """DALL-E dVAE encoder: `(N, 3, H, W)` in [eps, 1-eps] -> logits `(N, vocab, H/8, W/8)`."""

    def __init__(self, n_hid: int = 256, blocks_per_group: int = 2, vocab_size: int = VQ_CODEBOOK_SIZE,
                 in_channels: int = 3):
        super().__init__()
        self.n_hid, self.blocks_per_group, self.vocab_size = n_hid, blocks_per_group, vocab_size
        n_layers = GROUPS * blocks_per_group
        widths = [n_hid * 2 ** g for g in range(GROUPS)]  # 1, 2, 4, 8 x n_hid
        groups = [("input", DalleConv(in_channels, n_hid, 7))]
        previous = n_hid
        for g, width in enumerate(widths):
            layers = []
            for k in range(blocks_per_group):
                layers.append((f"block_{k + 1}", DalleEncoderBlock(previous if k == 0 else width, width, n_layers)))
            if g < GROUPS - 1:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
            previous = width
        groups.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", DalleConv(widths[-1], vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the dVAE encoder takes (N, 3, H, W), got {tuple(x.shape)}")
        return self.blocks(x)

    @staticmethod
    def map_pixels(x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> [eps, 1 - eps]: the dVAE was trained on this squeezed range."""
        return (1 - 2 * LOGIT_EPS) * x + LOGIT_EPS

    @classmethod
    def from_state_dict(cls, state: Dict[str, torch.Tensor], where: str = "dVAE encoder") -> "DalleEncoder":
        """Build with the sizes the state dict implies, then load it strictly."""
        state = _strip_encoder_prefix(state)
        try:
            input_w, output_w = state["blocks.input.w"], state["blocks.output.conv.w"]
        except KeyError as err:
            raise KeyError(f"{where}: not a DALL-E dVAE encoder state dict (no key {err}); "
                           "expected blocks.input.w, blocks.group_1..4.*, blocks.output.conv.w") from None
        n_hid, in_channels, vocab = input_w.shape[0], input_w.shape[1], output_w.shape[0]
        block_ids = {int(m.group(1)) for k in state for m in [re.match(r"blocks\.group_1\.block_(\d+)\.", k)] if m}
        if not block_ids:
            raise KeyError(f"{where}: no blocks.group_1.block_* keys")
        encoder = cls(n_hid=n_hid, blocks_per_group=max(block_ids), vocab_size=vocab, in_channels=in_channels)
        load_strict(encoder, state, where)
        return encoder


def _strip_encoder_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    for prefix in ("dalle.encoder.", "encoder."):
        if any(k.startswith(prefix + "blocks.") for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def vq_token_grid(encoder: DalleEncoder, frames: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Token ids `(N, h, w)` of unit-range frames `(N, 3, H, W)` resized to `(8h, 8w)`."""
    size = (DOWNSAMPLE * grid[0], DOWNSAMPLE * grid[1])
    # antialiased area-like shrink: a 4x bilinear without it would alias fine texture into the tokens
    small = resize_frames(frames, size, mode="bilinear").clamp(0.0, 1.0)
    logits = encoder(DalleEncoder.map_pixels(small))
    return logits.argmax(dim=1)


@TARGETS.register("vq")
class VQTarget(Target):
    """DALL-E token id per VT token; `checkpoint=None` means pre-extracted ids only."""

    name = "vq"

    def __init__(self, checkpoint: Optional[Union[str, os.PathLike]] = None, vocab_size: int = VQ_CODEBOOK_SIZE,
                 patch: int = 32):
        super().__init__(patch)
        self.checkpoint = checkpoint
        self.encoder: Optional[DalleEncoder] = None
        if checkpoint is not None:
            self.encoder = DalleEncoder.from_state_dict(read_state_dict(checkpoint), where=str(checkpoint))
            vocab_size = self.encoder.vocab_size
            self.to(self.device, self.dtype)
        self.spec = TargetSpec("token", vocab_size, "cross_entropy")

    def teachers(self):
        return [] if self.encoder is None else [self.encoder]

    @classmethod
    def random_teacher(cls, root: Path, **variant) -> Dict[str, Any]:
        save_safetensors(DalleEncoder().state_dict(), root / "dalle_encoder.safetensors")
        return {"checkpoint": str(root / "dalle_encoder.safetensors")}

    def _compute(self, video: torch.Tensor) -> TargetOutput:
        if self.encoder is None:
            raise RuntimeError("vq target has no dVAE encoder checkpoint and the batch carries no 'vq_tokens': "
                               "pass checkpoint=<dalle_encoder.pt> or pre-extract the tokens")
        b, t, _, height, width = video.shape
        grid = (height // self.patch, width // self.patch)
        frames = to_unit_range(video.reshape(b * t, 3, height, width).to(self.device, self.dtype))
        ids = vq_token_grid(self.encoder, frames, grid)
        return TargetOutput(ids.reshape(b, t, *grid).to(video.device, torch.long))


# ------------------------------------------------------------------------- extraction (frames -> VQ TSV)

def write_random_dvae(path: Union[str, os.PathLike], n_hid: int = 16, blocks_per_group: int = 1,
                      vocab_size: int = VQ_CODEBOOK_SIZE, seed: int = 0) -> Path:
    """Save a randomly initialised DALL-E dVAE encoder in the official state-dict layout (`.pt`).

    For demos and tests only: no weights can be downloaded here, and a random encoder still maps a
    local image patch to a stable code, which is all the CPU demo needs. Real runs convert OpenAI's
    encoder once (see the module docstring).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = DalleEncoder(n_hid=n_hid, blocks_per_group=blocks_per_group, vocab_size=vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(encoder.state_dict(), tmp)
    tmp.replace(path)
    return path


@dataclass
class VQExtraction:
    """What `extract_vq` wrote: the token TSV, its videos and frames, the token grid side, the time taken."""

    output: str
    videos: int
    frames: int
    grid: int
    seconds: float


def _frames_to_codes(encoder: DalleEncoder, frames: torch.Tensor, batch_frames: int) -> np.ndarray:
    """uint8 ``(N, 3, S, S)`` -> int16 codes ``(N, S/8, S/8)``, ``batch_frames`` frames per encoder call."""
    codes = []
    for start in range(0, frames.shape[0], batch_frames):
        pixels = frames[start:start + batch_frames].float() / 255.0
        codes.append(encoder(DalleEncoder.map_pixels(pixels)).argmax(dim=1).to(torch.int16))
    return torch.cat(codes).numpy()


def extract_vq(tsv: str, encoder: str, output: str, size: int = 128, batch_frames: int = 64,
               frame_column: Optional[int] = None, decoder: str = "auto", limit: Optional[int] = None,
               threads: Optional[int] = None) -> VQExtraction:
    """Frame TSV(s) -> VIMPAC VQ-token TSV, every stored frame through the DALL-E dVAE encoder (`violet-ds
    extract-vq` documents the arguments); returns what was written."""
    if size < DOWNSAMPLE or size % DOWNSAMPLE:
        raise ValueError(f"size must be a positive multiple of {DOWNSAMPLE}, got {size}")
    if threads:
        torch.set_num_threads(threads)
    model = DalleEncoder.from_state_dict(read_state_dict(encoder), where=str(encoder)).eval()
    transform = VideoTransform(size, train=False, mode="crop")
    tables = [TSVFile(path, frame_column=frame_column) for path in resolve_tsv_paths(tsv)]
    jobs = [(table, row) for table in tables for row in range(len(table))]
    if limit is not None:
        jobs = jobs[:limit]
    seen: set[str] = set()
    started = time.perf_counter()
    frames_done = 0

    def encoded() -> Iterator[tuple[str, np.ndarray]]:
        nonlocal frames_done
        with torch.inference_mode(), progress_bar(total=len(jobs), desc="extract-vq", unit="video") as progress:
            for table, row in jobs:
                key, frames = table.frames(row)
                if key in seen:
                    raise VQTokenError(f"{table.path}: row {row}: video id {key!r} repeats; VQ rows are keyed by id")
                seen.add(key)
                try:
                    video = transform(decode_frames(frames, decoder=decoder))
                except ValueError as err:
                    raise VQTokenError(f"{table.path}: row {row} ({key!r}): {err}") from err
                frames_done += video.shape[0]
                yield key, _frames_to_codes(model, video, batch_frames)
                progress.update(1)

    rows = write_vq_tsv(output, encoded())
    return VQExtraction(output, rows, frames_done, size // DOWNSAMPLE, time.perf_counter() - started)
