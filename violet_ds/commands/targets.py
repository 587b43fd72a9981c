"""`violet-ds extract-targets` and `violet-ds extract-vq`: pre-computed MVM targets. Each calls the library in
`violet_ds.targets` and prints what it wrote."""

from __future__ import annotations

from typing import Any, Dict, Optional

from violet_ds.targets import extract, vq


def extract_targets(
    tsv: str,
    target: str,
    output: str,
    options: Optional[Dict[str, Any]] = None,
    num_frames: int = 4,
    size: int = 224,
    batch_size: int = 4,
    device: str = "cpu",
    dtype: str = "float32",
    store_dtype: str = "float16",
    limit: Optional[int] = None,
    overwrite: bool = False,
    decoder: str = "auto",
    frame_column: Optional[int] = None,
    threads: Optional[int] = None,
) -> int:
    """Pre-compute an MVM target for every clip of a frame TSV into a resumable sidecar store.

    Args:
        tsv: frame TSV (`video_id<TAB>b64 JPEG ...`, with its .lineidx or one is built).
        target: registered target name (optical_flow, depth, vq, 2d_feature, 2d_clip_feature, 3d_feature, hog, pixel).
        output: sidecar folder to create or resume (meta.json, keys.txt, values.npy, valid.npy, done.npy).
        options: the target's options, e.g. {"checkpoint": "raft_large.pth"} or {"model_dir": "dpt-large/"}.
        num_frames: frames per clip (evenly spaced, segment centres).
        size: square frame side after short-side resize and centre crop (multiple of 32).
        batch_size: clips per teacher call.
        device: where the teacher runs (cpu, cuda, cuda:1).
        dtype: teacher compute dtype (float32, bf16, fp16).
        store_dtype: float16 or float32 for regression targets (token ids are always int16).
        limit: only the first N rows (smoke runs).
        overwrite: delete an existing store made with other settings instead of refusing.
        decoder: JPEG decoder (auto, simplejpeg, pillow).
        frame_column: first frame column (default: detected; 1 official layout, 2 VIOLETv2's).
        threads: torch CPU threads (default: torch's own choice).
    """
    done = extract.extract_targets(tsv, target, output, options=options, num_frames=num_frames, size=size,
                                   batch_size=batch_size, device=device, dtype=dtype, store_dtype=store_dtype,
                                   limit=limit, overwrite=overwrite, decoder=decoder, frame_column=frame_column,
                                   threads=threads)
    print(f"extract-targets: {done.target} -> {done.output}: {done.new_clips} new clips, {done.already_done} already "
          f"done, {done.stored}/{done.store_rows} in store; {done.ms_per_clip:.1f} ms/clip; value {done.value_shape} "
          f"{done.value_dtype}")
    return 0


def extract_vq(tsv: str, encoder: str, output: str, size: int = 128, batch_frames: int = 64,
               frame_column: Optional[int] = None, decoder: str = "auto", limit: Optional[int] = None,
               threads: Optional[int] = None) -> int:
    """Frame TSV(s) -> VIMPAC VQ-token TSV: every stored frame through the DALL-E dVAE encoder.

    Each frame is resized (short side) and centre-cropped to `size` pixels, then encoded to a
    `(size/8, size/8)` grid of the codebook's codes; a video keeps all its frames (clips are cut at
    training time, and short videos are padded then). Rows: `video_id<TAB>N,h,w<TAB>base64(int16)`.

    Args:
        tsv: frame TSV path, glob or comma-separated list (`video_id<TAB>b64 JPEG ...`).
        encoder: DALL-E dVAE encoder state dict (`.pt`/`.pth` read with weights_only, or `.safetensors`).
        output: the VQ TSV to write (its `.lineidx` is written next to it, atomically).
        size: square frame side in pixels before encoding (multiple of 8: 128 -> 16x16 tokens).
        batch_frames: frames per encoder call.
        frame_column: first frame column (default: detected).
        decoder: JPEG decoder (auto, simplejpeg, pillow).
        limit: only the first N videos (smoke runs).
        threads: torch CPU threads (default: torch's own choice).
    """
    done = vq.extract_vq(tsv, encoder, output, size=size, batch_frames=batch_frames, frame_column=frame_column,
                         decoder=decoder, limit=limit, threads=threads)
    print(f"extract-vq: {done.videos} videos, {done.frames} frames -> {done.output} ({done.grid}x{done.grid} "
          f"tokens per frame; {1000 * done.seconds / max(done.frames, 1):.1f} ms/frame, {done.seconds:.1f} s)")
    return 0
