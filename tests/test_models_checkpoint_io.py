"""Official VIOLET / VIOLETv2 / LAVENDER checkpoints <-> violet_ds task weights (`model.*`, `heads.*`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from violet_ds.models import create_model
from violet_ds.models.checkpoint_io import (
    OfficialModel,
    build_heads,
    convert_checkpoint,
    convert_official_state_dict,
    describe_official,
    load_official_checkpoint,
    to_official_state_dict,
)
from violet_ds.models.heads import MLMHead, MVMHead, ScoreHead
from violet_ds.weights import load_strict, read_state_dict

torch.set_num_threads(1)

LISTINGS = ["violet_pretrain.json", "violet_retrieval.json", "violet_qamc.json", "violet_qaoe.json",
            "empirical_mvm_pretrain_pixel.json", "empirical_mvm_pretrain_vq.json",
            "empirical_mvm_pretrain_2d_feature.json", "empirical_mvm_retrieval.json", "empirical_mvm_qaoe.json",
            "empirical_mvm_qaoe_mlm_head.json", "lavender_pretrain.json", "lavender_qaoe.json"]


def _listing_state(listing: dict, device: str) -> dict:
    """A state dict with every listed key (teachers and the legacy position_ids included)."""
    non_float = set(listing.get("non_float_keys", []))
    state = {}
    shapes = {**listing["tensors"], **listing.get("legacy_extra_keys_expected_in_official_ckpt", {})}
    for key, shape in shapes.items():
        integer = key in non_float or key.endswith(("relative_position_index", "position_ids"))
        state[key] = torch.empty(shape, dtype=torch.long if integer else torch.float16, device=device)
    return state


def test_all_listings_are_covered(state_dict_listings):
    on_disk = sorted(p.name for p in Path(state_dict_listings).glob("*.json"))
    assert on_disk == sorted(LISTINGS), "a new listing needs a line in LISTINGS"


@pytest.mark.parametrize("listing_name", LISTINGS)
def test_every_official_key_maps_to_a_parameter_of_the_same_shape(listing_name, state_dict_listings):
    """Listing -> state dict (fp16, shapes only) -> convert -> strict load into the matching model + heads."""
    listing = json.loads((state_dict_listings / listing_name).read_text())
    state = _listing_state(listing, device="meta")
    report = convert_official_state_dict(state)
    teachers = tuple(listing["teacher_prefixes"])
    assert sorted(report.teacher_keys) == sorted(k for k in state if teachers and k.startswith(teachers))
    assert report.legacy_keys == ["enc_txt.emb_txt.position_ids"] and report.unmatched == []
    # every non-teacher key is accounted for: mapped, or the duplicate of the MLM bias
    duplicates = 1 if "fc_mtm.predictions.decoder.bias" in state else 0
    assert len(report.state_dict) == len(state) - len(report.teacher_keys) - 1 - duplicates
    assert all(v.dtype in (torch.float32, torch.long) for v in report.state_dict.values())
    expected_model = "violet-v1" if listing_name.startswith("violet_") else "violet-v2"
    assert report.model_name == expected_model
    with torch.device("meta"):
        model = create_model(report.model_name)
        module = OfficialModel(model, build_heads(report.heads, model))
    load_strict(module, report.state_dict, source=listing_name)
    converted_params = sum(report.state_dict[k].numel() for k, _ in module.named_parameters())
    counts = listing["param_counts_unique"]
    assert converted_params == counts["total"] - counts["teacher"]


def test_describe_official_heads(state_dict_listings):
    def heads(name):
        return describe_official(_listing_state(json.loads((state_dict_listings / name).read_text()), "meta"))["heads"]

    assert heads("violet_pretrain.json") == {"score": {"out": 1}, "mlm": {"vocab_size": 30522, "tied": False},
                                             "mvm": {"kind": "token", "channels": 8192}}
    assert heads("violet_qaoe.json") == {"answer": {"out": 1000}}
    assert heads("empirical_mvm_pretrain_pixel.json")["mvm"] == {"kind": "dense", "channels": 3, "target": "pixel"}
    assert heads("empirical_mvm_pretrain_2d_feature.json")["mvm"] == {"kind": "feature", "channels": 1024}
    assert heads("lavender_qaoe.json") == {"mlm": {"vocab_size": 30522, "tied": False},
                                           "task_embedding": {"num_tasks": 10}}


def _small_task_module(seed: int = 0) -> OfficialModel:
    """violet-v2 layout (projection, order embedding) at test size, with the pretraining heads."""
    torch.manual_seed(seed)
    model = create_model("violet-v2", num_layers=1, vocab_size=300, max_frames=4,
                         swin_overrides={"depths": (1, 1, 1, 1)})
    heads = torch.nn.ModuleDict({"score": ScoreHead(768), "mlm": MLMHead(768, 300), "mvm": MVMHead(768, "dense", 3)})
    return OfficialModel(model, heads)


SMALL = dict(num_layers=1, swin_overrides={"depths": (1, 1, 1, 1)})


def test_roundtrip_values_fp16_and_cli(tmp_path):
    """ours -> official fp16 .pt (CLI) -> ours .safetensors (CLI) -> strict load: every value survives
    (up to fp16 rounding), the dense decoder keeps its target name, legacy position_ids are written."""
    module = _small_task_module()
    ours = tmp_path / "ours.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(ours), metadata={"mvm_target": "hog"})
    official_path = tmp_path / "official.pt"
    convert_checkpoint(str(ours), str(official_path), half=True)
    official = torch.load(official_path, map_location="cpu", weights_only=True)
    assert official["enc_img.fc.weight"].dtype == torch.float16 and "decoder_hog.0.weight" in official
    assert official["enc_txt.emb_txt.position_ids"].dtype == torch.long
    assert torch.equal(official["fc_mtm.predictions.bias"], official["fc_mtm.predictions.decoder.bias"])

    back = tmp_path / "back.safetensors"
    convert_checkpoint(str(official_path), str(back))
    restored = read_state_dict(back)
    assert set(restored) == set(module.state_dict())
    for key, value in module.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], expected), key

    loaded, report = load_official_checkpoint(official_path, **SMALL)
    assert report.model_name == "violet-v2" and sorted(loaded.heads) == ["mlm", "mvm", "score"]
    assert report.legacy_keys == ["enc_txt.emb_txt.position_ids"]
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, restored[key]), key
    # an official checkpoint is also accepted as create_model(weights=...) for the backbone
    backbone = create_model("violet-v2", weights=str(official_path), vocab_size=300, max_frames=4, **SMALL)
    assert torch.equal(backbone.video_proj.weight, restored["model.video_proj.weight"])


def test_official_dense_decoder_matches_our_head():
    """`decoder_pixel` = Conv2d(768, 32*32*3, 1) + PixelShuffle(32): our MVMHead with the mapped weights
    computes the same image from the video tokens."""
    torch.manual_seed(0)
    official = torch.nn.Sequential(torch.nn.Conv2d(768, 32 * 32 * 3, 1), torch.nn.PixelShuffle(32))
    head = MVMHead(768, "dense", 3)
    state = {k: v for k, v in official.state_dict().items()}
    mapped = convert_official_state_dict({"decoder_pixel." + k: v for k, v in state.items()}).state_dict
    head.load_state_dict({k[len("heads.mvm."):]: v for k, v in mapped.items()}, strict=True)
    tokens = torch.randn(2, 3, 2, 4, 768)  # (B, T, h, w, D)
    expected = official(tokens.reshape(6, 2, 4, 768).permute(0, 3, 1, 2)).reshape(2, 3, 3, 64, 128)
    torch.testing.assert_close(head(tokens), expected)


def test_tied_mlm_head_exports_with_a_decoder_copy():
    module = _small_task_module()
    module.heads["mlm"] = MLMHead(768, 300, tie_to=module.model.word_embeddings)
    state = module.state_dict()
    assert "heads.mlm.decoder.weight" not in state
    official = to_official_state_dict(state)
    assert torch.equal(official["fc_mtm.predictions.decoder.weight"], state["model.text_embeddings.word_embeddings.weight"])
    # and loads back as an untied head computing the same logits
    report = convert_official_state_dict(official)
    untied = MLMHead(768, 300)
    untied.load_state_dict({k[len("heads.mlm."):]: v for k, v in report.state_dict.items() if k.startswith("heads.mlm.")})
    hidden = torch.randn(2, 5, 768)
    torch.testing.assert_close(untied(hidden), module.heads["mlm"](hidden))


def test_unmatched_keys_are_reported_by_name(tmp_path):
    state = to_official_state_dict(_small_task_module().state_dict())
    state["enc_img.something_new"] = torch.zeros(3)
    state["dalle.encoder.blocks.0.weight"] = torch.zeros(3)  # a teacher: dropped, not unmatched
    with pytest.raises(KeyError, match="enc_img.something_new"):
        convert_official_state_dict(state)
    report = convert_official_state_dict(state, allow_unmatched=True)
    assert report.unmatched == ["enc_img.something_new"]
    assert report.teacher_keys == ["dalle.encoder.blocks.0.weight"]
    ours = _small_task_module().state_dict()
    ours["heads.classifier.weight"] = torch.zeros(2, 768)
    with pytest.raises(KeyError, match="heads.classifier.weight"):
        to_official_state_dict(ours)
    # a strict load names what does not fit
    module = _small_task_module()
    broken = dict(module.state_dict())
    broken.pop("model.video_norm.weight")
    with pytest.raises(KeyError, match="video_norm.weight"):
        load_strict(module, broken)


def test_checkpoints_are_read_weights_only(tmp_path):
    """A pickle holding anything but tensors and plain containers is refused, naming the file."""
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _NotAWeight()}, path)
    with pytest.raises(ValueError, match="evil.pt"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        read_state_dict(tmp_path / "missing.pt")


class _NotAWeight:
    pass


@pytest.mark.slow
def test_full_size_official_checkpoint_through_cli(tmp_path, state_dict_listings):
    """Full-size VIOLET (v1) QA checkpoint with random fp16 values -> `violet-ds convert-checkpoint` ->
    the real violet-v1 + answer head, loaded strictly, values preserved."""
    from violet_ds.cli import main

    listing = json.loads((state_dict_listings / "violet_qaoe.json").read_text())
    state = {k: (torch.randn(v.shape).half() if v.is_floating_point() else torch.zeros(v.shape, dtype=torch.long))
             for k, v in _listing_state(listing, "cpu").items()}
    src = tmp_path / "violet_qaoe.pt"
    torch.save(state, src)
    dst = tmp_path / "violet_qaoe.safetensors"
    main(["convert-checkpoint", "--src", str(src), "--dst", str(dst)])
    module, report = load_official_checkpoint(src)
    assert report.model_name == "violet-v1" and list(module.heads) == ["answer"]
    converted = read_state_dict(dst)
    own = module.state_dict()
    assert set(converted) == set(own)
    for key in ("model.video_backbone.layers.2.blocks.17.attn.qkv.weight", "heads.answer.3.weight",
                "model.cross_encoder.layer.11.output.dense.weight"):
        assert torch.equal(own[key], converted[key])
