"""MVM target interface: spec checks, masked-only losses (gradient checks), weighted mixes, pixel target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from violet_ds.targets import (TargetOutput, TargetSpec, create_target, create_targets, list_targets, mvm_loss,
                               target_from_batch)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def fixture_clip(official_dir):
    """Two real MSRVTT clips from the official fixture TSV: normalised float (2, 3, 3, 64, 64)."""
    from violet_ds.data.frames import normalize
    from violet_ds.data.tsv import TSVFile
    from violet_ds.targets.extract import read_row_clip

    tsv = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    clips = torch.stack([read_row_clip(tsv, row, num_frames=3, size=64) for row in (0, 1)])
    return normalize(clips)


def test_every_issue_target_is_registered():
    names = set(list_targets())
    assert {"pixel", "hog", "optical_flow", "depth", "vq", "2d_feature", "2d_clip_feature", "3d_feature"} <= names
    with pytest.raises(KeyError, match="unknown MVM target 'hgo'.*'hog'"):
        create_target("hgo")


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        TargetSpec("pixels", 3, "l1")
    with pytest.raises(ValueError, match="cross_entropy"):
        TargetSpec("token", 10, "l1")


@pytest.mark.parametrize("kind", ["dense", "feature", "token"])
def test_mvm_loss_only_masked_tokens_get_gradient(kind):
    torch.manual_seed(0)
    b, t, h, w, c, patch = 2, 3, 2, 2, 4, 8
    if kind == "dense":
        spec = TargetSpec("dense", c, "l1")
        value = torch.randn(b, t, c, h * patch, w * patch)
        pred = torch.randn_like(value, requires_grad=True)
    elif kind == "feature":
        spec = TargetSpec("feature", c, "l1")
        value = torch.randn(b, t, h, w, c)
        pred = torch.randn_like(value, requires_grad=True)
    else:
        spec = TargetSpec("token", 7, "cross_entropy")
        value = torch.randint(0, 7, (b, t, h, w))
        pred = torch.randn(b, t, h, w, 7, requires_grad=True)
    mask = torch.zeros(b, t, h, w, dtype=torch.bool)
    mask[0, 1, 0, 1] = mask[1, 2, 1, 0] = mask[1, 0, 0, 0] = True
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 0] = False  # this frame's masked token must not count either
    loss = mvm_loss(pred, TargetOutput(value, valid), mask, spec)
    loss.backward()
    effective = mask & valid[:, :, None, None]
    if kind == "dense":
        token_grad = pred.grad.abs().reshape(b, t, c, h, patch, w, patch).sum(dim=(2, 4, 6))
        expected = (pred - value).abs().reshape(b, t, c, h, patch, w, patch).permute(0, 1, 3, 5, 2, 4, 6)[effective].mean()
    elif kind == "feature":
        token_grad = pred.grad.abs().sum(-1)
        expected = (pred - value).abs()[effective].mean()
    else:
        token_grad = pred.grad.abs().sum(-1)
        expected = nn.functional.cross_entropy(pred[effective], value[effective])
    assert torch.all(token_grad[~effective] == 0)
    assert torch.all(token_grad[effective] > 0)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_mvm_loss_nothing_masked_is_zero_with_graph():
    spec = TargetSpec("feature", 3, "l1")
    pred = torch.randn(1, 1, 2, 2, 3, requires_grad=True)
    loss = mvm_loss(pred, TargetOutput(torch.randn(1, 1, 2, 2, 3)), torch.zeros(1, 1, 2, 2, dtype=torch.bool), spec)
    loss.backward()
    assert loss.item() == 0.0 and pred.grad is not None and pred.grad.abs().sum() == 0


def test_mvm_loss_rejects_misaligned_prediction():
    spec = TargetSpec("dense", 3, "l1")
    with pytest.raises(ValueError, match="does not match"):
        mvm_loss(torch.randn(1, 1, 3, 32, 32), TargetOutput(torch.randn(1, 1, 3, 64, 64)),
                 torch.ones(1, 1, 2, 2, dtype=torch.bool), spec)


def test_pixel_target_on_fixture_frames(fixture_clip):
    target = create_target("pixel")
    out = target.compute(fixture_clip)
    assert target.spec == TargetSpec("dense", 3, "l1")
    assert out.value.shape == fixture_clip.shape and out.valid is None
    assert torch.equal(out.value, fixture_clip)
    assert not out.value.requires_grad and out.value.data_ptr() != fixture_clip.data_ptr()
    # one masked token of frame 2 of clip 1: the loss equals the L1 over exactly its 32x32 pixels
    pred = torch.zeros_like(out.value, requires_grad=True)
    mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    mask[1, 2, 1, 0] = True
    loss = mvm_loss(pred, out, mask, target.spec)
    assert torch.allclose(loss, fixture_clip[1, 2, :, 32:64, 0:32].abs().mean())
    loss.backward()
    assert pred.grad[1, 2, :, 32:64, 0:32].abs().sum() > 0
    pred.grad[1, 2, :, 32:64, 0:32] = 0
    assert pred.grad.abs().sum() == 0


def test_target_rejects_bad_clips():
    target = create_target("pixel")
    with pytest.raises(ValueError, match="multiple of the VT patch"):
        target.compute(torch.zeros(1, 2, 3, 48, 64))
    with pytest.raises(ValueError, match="float clip"):
        target.compute(torch.zeros(1, 2, 48, 64))
    with pytest.raises(ValueError, match="normalise"):
        target.compute(torch.zeros(1, 2, 3, 64, 64, dtype=torch.uint8))


def test_weighted_mix(fixture_clip):
    mix = create_targets({"pixel": 1.0, "hog": 0.5}, {"hog": {"layout": "feature"}})
    assert mix.names() == ["pixel", "hog"] and mix.weights == {"pixel": 1.0, "hog": 0.5}
    assert mix.specs["hog"] == TargetSpec("feature", 144, "l1") and mix.teachers() == []
    outputs = mix.compute(fixture_clip)
    preds = {name: torch.zeros_like(out.value, requires_grad=True) for name, out in outputs.items()}
    mask = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.5
    total, parts = mix.loss(preds, outputs, mask)
    assert set(parts) == {"pixel", "hog"}
    assert torch.allclose(total, parts["pixel"] + 0.5 * parts["hog"])
    assert create_targets("pixel").names() == ["pixel"]
    with pytest.raises(KeyError, match="not in the mix"):
        create_targets({"pixel": 1.0}, {"hog": {}})


def test_pre_extracted_targets_come_from_the_batch():
    spec = TargetSpec("token", 8192, "cross_entropy")
    tokens = torch.randint(0, 8192, (2, 3, 2, 2))
    from_vq = target_from_batch("vq", spec, {"vq_tokens": tokens.short()})
    assert from_vq.value.dtype == torch.long and torch.equal(from_vq.value, tokens)
    stored = torch.randn(2, 3, 2, 2, 5)
    valid = torch.ones(2, 3, dtype=torch.bool)
    named = target_from_batch("2d_feature", TargetSpec("feature", 5, "l1"),
                              {"mvm_target:2d_feature": stored, "mvm_target_valid:2d_feature": valid}, single=False)
    assert named.value is stored and named.valid is valid
    assert target_from_batch("2d_feature", TargetSpec("feature", 5, "l1"), {"mvm_target": stored}, single=False) is None
    assert target_from_batch("pixel", TargetSpec("dense", 3, "l1"), {"video": stored}) is None
