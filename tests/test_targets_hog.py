"""HOG in torch vs scikit-image's `hog` on real MSRVTT frames, and its layout on the token grid.

Tolerance: max abs difference <= 1e-6 per descriptor element (float32 and float64) when both see
the same 8-bit frames; measured ~1.5e-7 (float32) / ~1e-7 (float64).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from violet_ds.targets import TargetSpec, create_target, mvm_loss
from violet_ds.targets.hog import blocks_to_cells, hog_descriptor

skimage_feature = pytest.importorskip("skimage.feature")
torch.set_num_threads(2)
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def frames(official_dir):
    """uint8 (6, 3, 240, 320) RGB frames: 2 frames each from 3 fixture videos, at their stored size."""
    from violet_ds.data.frames import decode_frames
    from violet_ds.data.tsv import TSVFile

    tsv = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    return torch.cat([decode_frames(tsv.frames(row)[1][1:3]) for row in (0, 3, 7)])


def skimage_hog(image: np.ndarray, block_norm: str = "L2-Hys", channel_axis=-1) -> np.ndarray:
    return skimage_feature.hog(image, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2),
                               block_norm=block_norm, feature_vector=False, channel_axis=channel_axis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_descriptor_matches_skimage_on_real_frames(frames, dtype):
    ours = hog_descriptor(frames.to(dtype))  # one batched call for all frames
    for index, frame in enumerate(frames):
        reference = skimage_hog(frame.permute(1, 2, 0).numpy())
        assert ours[index].shape == reference.shape == (29, 39, 2, 2, 9)
        assert np.abs(ours[index].double().numpy() - reference).max() <= TOLERANCE


@pytest.mark.parametrize("block_norm", ["L1", "L1-sqrt", "L2"])
def test_other_block_norms_match_skimage(frames, block_norm):
    ours = hog_descriptor(frames[:2].double(), block_norm=block_norm)
    for index in range(2):
        reference = skimage_hog(frames[index].permute(1, 2, 0).numpy(), block_norm)
        assert np.abs(ours[index].numpy() - reference).max() <= TOLERANCE


def test_grayscale_matches_skimage(frames):
    from skimage.color import rgb2gray

    gray = rgb2gray(frames[0].permute(1, 2, 0).numpy())
    ours = hog_descriptor(torch.from_numpy(gray)[None, None])
    assert np.abs(ours[0].numpy() - skimage_hog(gray, channel_axis=None)).max() <= TOLERANCE


def test_hog_target_equals_skimage_through_normalisation(frames):
    """The target sees the normalised float32 clip; quantising back to 8 bits recovers skimage's input."""
    from violet_ds.data.frames import center_crop, normalize

    crops = center_crop(frames, 224)  # (6, 3, 224, 224)
    video = normalize(crops).reshape(2, 3, 3, 224, 224)
    target = create_target("hog")
    assert target.spec == TargetSpec("dense", 9, "l1")
    out = target.compute(video)
    assert out.value.shape == (2, 3, 9, 224, 224) and out.value.dtype == torch.float32
    reference = np.stack([skimage_hog(crop.permute(1, 2, 0).numpy()) for crop in crops])  # (6, 27, 27, 2, 2, 9)
    expected_cells = blocks_to_cells(torch.from_numpy(reference))  # (6, 9, 28, 28)
    cells = out.value.reshape(6, 9, 28, 8, 28, 8)
    # dense layout: constant over each 8x8 cell and equal to the mean of the cell's normalised copies
    assert torch.all(cells == cells[:, :, :, :1, :, :1])
    assert (cells[:, :, :, 0, :, 0].double() - expected_cells).abs().max() <= TOLERANCE
    # corner cells belong to a single block: their value is exactly skimage's block entry
    assert np.allclose(cells[:, :, 0, 0, 0, 0].double().numpy(), reference[:, 0, 0, 0, 0, :], atol=TOLERANCE)

    feature = create_target("hog", layout="feature")
    tokens = feature.compute(video).value
    assert feature.spec == TargetSpec("feature", 144, "l1") and tokens.shape == (2, 3, 7, 7, 144)
    # token (1, 2) of frame 0: its 4x4 cells, row-major, 9 orientations each
    block = expected_cells[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)
    assert (tokens[0, 0, 1, 2].double() - block).abs().max() <= TOLERANCE


def test_hog_loss_only_from_masked_tokens(frames):
    from violet_ds.data.frames import center_crop, normalize

    video = normalize(center_crop(frames[:4], 64)).reshape(2, 2, 3, 64, 64)
    target = create_target("hog")
    out = target.compute(video)
    assert out.value.shape == (2, 2, 9, 64, 64) and out.value.abs().sum() > 0
    pred = torch.zeros_like(out.value, requires_grad=True)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[0, 1, 1, 1] = True
    loss = mvm_loss(pred, out, mask, target.spec)
    assert torch.allclose(loss, out.value[0, 1, :, 32:, 32:].abs().mean())
    loss.backward()
    grad = pred.grad.clone()
    assert grad[0, 1, :, 32:, 32:].abs().sum() > 0
    grad[0, 1, :, 32:, 32:] = 0
    assert grad.abs().sum() == 0


def test_hog_runs_in_bf16_and_keeps_dtype(frames):
    from violet_ds.data.frames import center_crop, normalize

    video = normalize(center_crop(frames[:2], 64)).reshape(1, 2, 3, 64, 64)
    target = create_target("hog").to("cpu", "bf16")
    out32 = target.compute(video)
    out16 = target.compute(video.bfloat16())
    assert out16.value.dtype == torch.bfloat16
    # bf16 input loses 8-bit exactness only through rounding of the normalised values: bins mostly agree
    assert (out16.value.float() - out32.value).abs().mean() < 0.02
