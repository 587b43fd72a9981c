"""VIMPAC transformer: T,H|W attention vs a naive loop reference, positional-embedding
interpolation, registry, heads, parameter counts per part."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from violet_ds.models.vimpac import (
    VIMPAC_SIZES,
    VimpacClassifier,
    VimpacContrastiveHead,
    VimpacTokenHead,
    parameter_counts,
    resize_axis_embedding,
)
from violet_ds.registry import MODELS

torch.set_num_threads(2)

TINY = dict(hidden_size=16, num_layers=2, num_heads=4, head_dim=4, mlp_size=24, frames=3, height=4, width=5)


def _tiny(**overrides):
    model = MODELS.create("vimpac-small", **{**TINY, **overrides})
    return model.eval()


# ----------------------------------------------------------------------------- naive reference

def _naive_heads(queries, keys, values, head_slice, head_dim):
    """Softmax attention of one sequence, heads in ``head_slice``: (L, A) x3 -> (L, n*d)."""
    outs = []
    for head in range(head_slice.start, head_slice.stop):
        cols = slice(head * head_dim, (head + 1) * head_dim)
        q, k, v = queries[:, cols], keys[:, cols], values[:, cols]
        weights = torch.softmax(q @ k.t() / math.sqrt(head_dim), dim=-1)
        outs.append(weights @ v)
    return torch.cat(outs, dim=-1)


def _naive_axis_attention(module, hidden, cls, valid):
    """Loop over every line of every axis of ``module.axes``; [CLS] first in each line."""
    batch, t, h, w, _ = hidden.shape
    size = module.num_heads * module.head_dim
    d = module.head_dim
    grid_out = torch.zeros(batch, t, h, w, size, dtype=hidden.dtype)
    cls_out = torch.zeros(batch, size, dtype=hidden.dtype)
    first = 0
    for axis, count in module.axes:
        heads = slice(first, first + count)
        cols = slice(first * d, (first + count) * d)
        first += count
        for b in range(batch):
            line_cls = []
            ranges = [range(t), range(h), range(w)]
            ranges[axis - 1] = [None]
            for i in ranges[0]:
                for j in ranges[1]:
                    for k in ranges[2]:
                        index = [i, j, k]
                        positions = []
                        for p in range(hidden.shape[axis]):
                            index[axis - 1] = p
                            positions.append(tuple(index))
                        seq = torch.stack([cls[b]] + [hidden[(b,) + pos] for pos in positions])
                        keep = [0] + [n + 1 for n, pos in enumerate(positions)
                                      if valid is None or bool(valid[(b,) + pos])]
                        qkv = module.qkv(seq)
                        q, kk, v = qkv.split(size, dim=-1)
                        out = _naive_heads(q, kk[keep], v[keep], heads, d)
                        for n, pos in enumerate(positions):
                            grid_out[(b,) + pos + (cols,)] = out[n + 1]
                        if len(keep) > 1:
                            line_cls.append(out[0])
            cls_out[b, cols] = torch.stack(line_cls).mean(0)
    return module.proj(grid_out), module.proj(cls_out)


def _naive_forward(model, tokens, valid=None):
    emb = model.backbone.embeddings
    _, t, h, w = tokens.shape
    pos = (resize_axis_embedding(emb.pos_t, t)[:, None, None] + resize_axis_embedding(emb.pos_h, h)[None, :, None]
           + resize_axis_embedding(emb.pos_w, w)[None, None, :])
    hidden = emb.norm(emb.token(tokens) + pos)
    cls = emb.norm(emb.cls).expand(tokens.shape[0], -1)
    for layer in model.backbone.layers:
        update, cls_update = _naive_axis_attention(layer.temporal, hidden, cls, valid)
        hidden, cls = layer.norm_temporal(hidden + update), layer.norm_temporal(cls + cls_update)
        update, cls_update = _naive_axis_attention(layer.spatial, hidden, cls, valid)
        hidden, cls = layer.norm_spatial(hidden + update), layer.norm_spatial(cls + cls_update)
        hidden, cls = layer.norm_mlp(hidden + layer.mlp(hidden)), layer.norm_mlp(cls + layer.mlp(cls))
    return hidden, cls


# ----------------------------------------------------------------------------- tests

def test_thw_attention_matches_naive_reference():
    torch.manual_seed(0)
    model = _tiny()
    tokens = torch.randint(0, 8192, (2, 3, 4, 5))
    with torch.no_grad():
        out = model(tokens)
        ref_hidden, ref_cls = _naive_forward(model, tokens)
    assert out.hidden.shape == (2, 3, 4, 5, 16) and out.cls.shape == (2, 16)
    torch.testing.assert_close(out.hidden, ref_hidden, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls, ref_cls, atol=2e-5, rtol=1e-4)


def test_spatial_attention_splits_heads_between_height_and_width():
    model = _tiny()
    layer = model.backbone.layers[0]
    assert layer.temporal.axes == ((1, 4),)
    assert layer.spatial.axes == ((2, 2), (3, 2))
    # one shared output projection over the concatenated halves
    assert layer.spatial.proj.in_features == 16


def test_pad_frames_are_masked_like_the_reference():
    torch.manual_seed(1)
    model = _tiny()
    pad = model.config.pad_id
    tokens = torch.randint(0, 8192, (2, 3, 4, 5))
    tokens[1, 2] = pad  # a short video: its last frame is padding
    with torch.no_grad():
        out = model(tokens)
        ref_hidden, ref_cls = _naive_forward(model, tokens, valid=tokens != pad)
    real = tokens != pad
    torch.testing.assert_close(out.hidden[real], ref_hidden[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out.cls, ref_cls, atol=2e-5, rtol=1e-4)
    # the padded frame does not change the real tokens' outputs of the other video
    with torch.no_grad():
        alone = model(tokens[:1])
    torch.testing.assert_close(alone.hidden, out.hidden[:1], atol=1e-5, rtol=1e-5)


def test_axis_embedding_interpolation_by_hand():
    table = torch.tensor([[0.0, 10.0], [1.0, 20.0], [3.0, 40.0]])
    assert resize_axis_embedding(table, 3) is table
    resized = resize_axis_embedding(table, 6)
    # align_corners=False: output i samples source x = (i + 0.5) * 3 / 6 - 0.5, clamped to [0, 2]
    expected = []
    for i in range(6):
        x = min(max((i + 0.5) * 3 / 6 - 0.5, 0.0), 2.0)
        lo = int(math.floor(x))
        hi = min(lo + 1, 2)
        expected.append(table[lo] * (1 - (x - lo)) + table[hi] * (x - lo))
    torch.testing.assert_close(resized, torch.stack(expected))


def test_position_embedding_interpolates_between_stages():
    torch.manual_seed(2)
    stage1 = _tiny()  # tables 3 x 4 x 5
    stage2 = _tiny(frames=6, height=8, width=10)
    missing, unexpected = stage2.load_state_dict(stage1.state_dict(), strict=True)
    assert not missing and not unexpected
    emb1, emb2 = stage1.backbone.embeddings, stage2.backbone.embeddings
    assert emb2.pos_t.shape == (6, 16) and emb2.pos_h.shape == (8, 16) and emb2.pos_w.shape == (10, 16)
    torch.testing.assert_close(emb2.pos_h, F.interpolate(emb1.pos_h.t()[None], size=8, mode="linear")[0].t())
    # interpolating on the fly (stage-1 model on a stage-2 grid) equals loading interpolated tables
    tokens = torch.randint(0, 8192, (2, 6, 8, 10))
    with torch.no_grad():
        torch.testing.assert_close(stage1(tokens).hidden, stage2(tokens).hidden, atol=1e-5, rtol=1e-5)
        smaller = stage1(tokens[:, :3, :4, :5])
    assert smaller.hidden.shape == (2, 3, 4, 5, 16)


def test_registry_overrides_and_errors():
    for name in ("vimpac-small", "vimpac-base", "vimpac-large-half"):
        assert name in MODELS
    model = MODELS.create("vimpac-base", **TINY)
    assert model.hidden_size == 16 and hasattr(model, "backbone")
    with pytest.raises(TypeError, match="unknown override"):
        MODELS.create("vimpac-small", hidden=3)
    with pytest.raises(ValueError, match="num_heads must be even"):
        MODELS.create("vimpac-small", num_heads=3)


def test_heads_tied_zero_init_and_grad_checkpointing():
    torch.manual_seed(3)
    model = _tiny().train()
    head = VimpacTokenHead(model.config, model.token_embeddings)
    assert "tied_embeddings" not in dict(head.named_modules())
    assert [name for name, _ in head.named_parameters()] == [
        "bias", "transform.weight", "transform.bias", "norm.weight", "norm.bias"]
    hidden = torch.randn(7, 16)
    logits = head(hidden)
    assert logits.shape == (7, model.config.vocab_size)
    logits.sum().backward()
    assert model.token_embeddings.weight.grad is not None, "the decoder is the token embedding"
    classifier = VimpacClassifier(16, 5)
    assert torch.count_nonzero(classifier(torch.randn(3, 16))) == 0
    contrastive = VimpacContrastiveHead(16, inner_size=32, out_size=8)
    assert contrastive(torch.randn(4, 16)).shape == (4, 8)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in contrastive.modules()) == 2

    tokens = torch.randint(0, 8192, (2, 3, 4, 5))
    torch.manual_seed(5)
    plain = model(tokens).cls.sum()
    model.set_grad_checkpointing(True)
    torch.manual_seed(5)
    checkpointed = model(tokens).cls.sum()
    torch.testing.assert_close(plain, checkpointed)
    checkpointed.backward()


def test_parameter_counts_per_part():
    print()
    for name, size in VIMPAC_SIZES.items():
        counts = parameter_counts(name)
        print(name, " ".join(f"{part}={count / 1e6:.2f}M" for part, count in counts.items()))
        d, a, m, layers = size["hidden_size"], size["num_heads"] * size["head_dim"], size["mlp_size"], size["num_layers"]
        attention = d * 3 * a + 3 * a + a * d + d
        assert counts["temporal_attention"] == counts["spatial_attention"] == layers * attention
        assert counts["mlp"] == layers * (2 * d * m + m + d)
        assert counts["token_embedding"] == 8197 * d
        assert counts["token_head"] == d * d + d + 2 * d + 8197
        parts = ("token_embedding", "position_embedding", "temporal_attention", "spatial_attention", "mlp", "layer_norms")
        assert counts["backbone"] == sum(counts[p] for p in parts)
    assert parameter_counts("vimpac-small")["backbone"] < parameter_counts("vimpac-base")["backbone"] \
        < parameter_counts("vimpac-large-half")["backbone"]
