"""Frame decoding, temporal sampling, spatial transforms and normalisation."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from violet_ds.data.frames import (IMAGENET_MEAN, IMAGENET_STD, FrameDecodeError, VideoTransform, available_decoders,
                                   decode_frames, decode_jpeg, denormalize, encode_b64_jpeg, normalize,
                                   sample_frame_indices)


def _image(height=48, width=64, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    return np.clip(base + rng.normal(0, 5, (height, width, 3)), 0, 255).astype(np.uint8)


def test_decoders_agree_on_official_frames(official_dir):
    from violet_ds.data.tsv import TSVFile

    frame = TSVFile(official_dir / "_tools" / "msrvtt.tsv").frames(0)[1][0]
    outputs = {name: decode_jpeg(frame, name) for name in available_decoders()}
    assert set(outputs) >= {"simplejpeg", "pillow"}
    reference = outputs["pillow"].float()
    for name, image in outputs.items():
        assert image.shape == (3, 240, 320) and image.dtype == torch.uint8
        assert (image.float() - reference).abs().mean() < 1.5, name


def test_decode_inputs_and_png_fallback():
    image = _image()
    b64 = encode_b64_jpeg(image, quality=95)
    from_str = decode_jpeg(b64)
    assert torch.equal(from_str, decode_jpeg(b64.encode()))
    assert torch.equal(from_str, decode_jpeg(base64.b64decode(b64)))
    assert (from_str.permute(1, 2, 0).float() - torch.from_numpy(image).float()).abs().mean() < 4
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    png = decode_jpeg(base64.b64encode(buffer.getvalue()).decode())
    assert torch.equal(png.permute(1, 2, 0), torch.from_numpy(image))


@pytest.mark.parametrize("decoder", ["auto", "simplejpeg", "pillow"])
def test_undecodable_frames_raise(decoder):
    if decoder != "auto" and decoder not in available_decoders():
        pytest.skip(f"{decoder} not installed")
    with pytest.raises(FrameDecodeError, match="base64"):
        decode_jpeg("not base64 at all!!", decoder)
    broken = base64.b64encode(b"\xff\xd8\xff\xe0" + b"garbage" * 20).decode()
    with pytest.raises(FrameDecodeError, match="undecodable"):
        decode_jpeg(broken, decoder)
    good = encode_b64_jpeg(_image())
    with pytest.raises(FrameDecodeError, match="frame 1"):
        decode_frames([good, broken], decoder)


def test_frames_of_different_sizes_are_resized_to_the_first():
    video = decode_frames([encode_b64_jpeg(_image(48, 64)), encode_b64_jpeg(_image(96, 128))])
    assert video.shape == (2, 3, 48, 64)


def test_temporal_sampling():
    assert sample_frame_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    assert sample_frame_indices(5, 5).tolist() == [0, 1, 2, 3, 4]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        drawn = sample_frame_indices(20, 4, train=True, generator=generator)
        segments = drawn // 5
        assert segments.tolist() == [0, 1, 2, 3]  # one frame inside each segment
    draws = {tuple(sample_frame_indices(20, 4, train=True, generator=generator).tolist()) for _ in range(20)}
    assert len(draws) > 1
    assert sample_frame_indices(3, 5, short="repeat").tolist() == [0, 0, 1, 1, 2]
    assert sample_frame_indices(3, 5, short="loop").tolist() == [0, 1, 2, 0, 1]
    assert sample_frame_indices(3, 5, short="pad").tolist() == [0, 1, 2, 2, 2]
    assert sample_frame_indices(1, 4).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        sample_frame_indices(0, 4)


def test_spatial_transforms():
    video = torch.randint(0, 255, (4, 3, 60, 80), dtype=torch.uint8)
    for mode in ("resize", "crop", "pad"):
        for train in (False, True):
            out = VideoTransform(32, train=train, mode=mode, flip=True, scale=1.3)(video)
            assert out.shape == (4, 3, 32, 32) and out.dtype == torch.uint8
    center = VideoTransform(60, train=False, mode="crop")(video)
    assert torch.equal(center, video[..., 10:70])
    padded = VideoTransform(80, mode="pad")(video)
    assert torch.all(padded[..., :10, :] == 0) and torch.equal(padded[..., 10:70, :], video)
    generator = torch.Generator().manual_seed(3)
    flips = [torch.equal(VideoTransform(60, train=True, mode="crop", flip=True)(video[..., :60, :60], generator),
                         video[..., :60, :60].flip(-1)) for _ in range(20)]
    assert any(flips) and not all(flips)


def test_normalize_matches_imagenet_and_inverts():
    video = torch.randint(0, 255, (2, 3, 3, 8, 8), dtype=torch.uint8)
    out = normalize(video)
    assert out.dtype == torch.float32 and out.shape == video.shape
    manual = (video.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(out, manual, atol=1e-6)
    assert torch.equal(denormalize(out), video)
    assert normalize(video, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="channels"):
        normalize(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
