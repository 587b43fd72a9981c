"""Teacher-based MVM targets on real MSRVTT fixture frames.

Each teacher is a randomly initialised *tiny* model saved in the teacher's real checkpoint format
(torch/safetensors state dicts with the official key layout, `save_pretrained` folders), loaded back
through the target's factory, run on real frames, and checked for: shape on the VT token grid,
alignment (a token's target equals the teacher output computed directly for that position), frozen
teacher (eval, no grad, not reachable as a submodule), and that only masked (valid) tokens drive the
loss through the real `MVMHead`.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from violet_ds.data.frames import to_unit_range
from violet_ds.models.heads import MVMHead
from violet_ds.targets import TargetOutput, create_target, mvm_loss

torch.set_num_threads(2)
B, T, SIZE = 2, 3, 64
GRID = (SIZE // 32, SIZE // 32)


@pytest.fixture(scope="module")
def clip(official_dir):
    """Two real MSRVTT clips, normalised float (2, 3, 3, 64, 64)."""
    from violet_ds.data.frames import normalize
    from violet_ds.data.tsv import TSVFile
    from violet_ds.targets.extract import read_row_clip

    tsv = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    return normalize(torch.stack([read_row_clip(tsv, row, num_frames=T, size=SIZE) for row in (2, 5)]))


def check_target(target, video: torch.Tensor) -> TargetOutput:
    """Shape, frozen teachers, and masked-only gradients through the real MVM head."""
    out = target.compute(video)
    assert tuple(out.value.shape) == target.expected_shape(video.shape)
    assert not out.value.requires_grad
    if out.value.is_floating_point():
        assert torch.isfinite(out.value).all()
    for teacher in target.teachers():
        assert not teacher.training
        assert all(not p.requires_grad for p in teacher.parameters())
    # the target object is no nn.Module: a task holding it cannot register the teacher
    assert not isinstance(target, nn.Module)

    torch.manual_seed(0)
    b, t = video.shape[:2]
    grid = (video.shape[-2] // 32, video.shape[-1] // 32)
    hidden = torch.randn(b, t, *grid, 16, requires_grad=True)
    head = MVMHead(16, target.spec.kind, target.spec.channels, patch=32).eval()
    mask = torch.zeros(b, t, *grid, dtype=torch.bool)
    mask[0, 0, 0, 1] = mask[b - 1, 1, 1, 0] = mask[0, t - 1, 1, 1] = True
    loss = mvm_loss(head(hidden), out, mask, target.spec)
    loss.backward()
    effective = mask if out.valid is None else mask & out.valid[:, :, None, None]
    token_grad = hidden.grad.abs().sum(-1)
    assert torch.all(token_grad[~effective] == 0)
    assert torch.all(token_grad[effective] > 0) or not effective.any()
    return out


# ------------------------------------------------------------------------------------------------ vq

def test_dalle_encoder_has_the_official_layout():
    from violet_ds.targets.vq import DalleEncoder

    with torch.device("meta"):
        encoder = DalleEncoder()  # official sizes: n_hid 256, 2 blocks per group, 8192 tokens
    shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    assert shapes["blocks.input.w"] == (256, 3, 7, 7)
    assert shapes["blocks.group_1.block_1.res_path.conv_1.w"] == (64, 256, 3, 3)
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert "blocks.group_1.block_1.id_path.w" not in shapes  # same width: identity path
    assert shapes["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    assert len(shapes) == 2 + 4 * 2 * 8 + 3 * 2 + 2


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_vq_target(clip, tmp_path, fmt):
    from violet_ds.targets.vq import DalleEncoder

    torch.manual_seed(0)
    encoder = DalleEncoder(n_hid=8, blocks_per_group=1, vocab_size=64).eval()
    path = tmp_path / f"dalle_encoder.{fmt}"
    if fmt == "pt":
        # a VIOLETv2 pretraining checkpoint keeps the teacher under `dalle.encoder.`
        torch.save({f"dalle.encoder.{k}": v for k, v in encoder.state_dict().items()}, path)
    else:
        from safetensors.torch import save_file

        save_file(encoder.state_dict(), str(path))
    target = create_target("vq", checkpoint=str(path))
    assert target.spec.kind == "token" and target.spec.channels == 64
    out = check_target(target, clip)
    assert out.value.dtype == torch.long and out.value.shape == (B, T, *GRID)
    # alignment: ids of one frame resized to (8h, 8w) = 16x16, computed directly
    frame = to_unit_range(clip[1, 2])[None]
    small = nn.functional.interpolate(frame, size=(16, 16), mode="bilinear", antialias=True,
                                      align_corners=False).clamp(0, 1)
    with torch.no_grad():
        expected = encoder(0.8 * small + 0.1).argmax(1)[0]
    assert torch.equal(out.value[1, 2], expected)


def test_vq_pre_extracted_only():
    target = create_target("vq")
    assert target.spec.channels == 8192 and target.teachers() == []
    with pytest.raises(RuntimeError, match="vq_tokens"):
        target.compute(torch.zeros(1, 1, 3, 32, 32))


def test_vq_rejects_pickled_module_and_wrong_keys(tmp_path):
    from violet_ds.targets.vq import DalleEncoder

    pickled = tmp_path / "encoder.pkl"
    torch.save(DalleEncoder(n_hid=8, blocks_per_group=1, vocab_size=16), pickled)  # a whole module
    with pytest.raises(ValueError, match="weights-only"):
        create_target("vq", checkpoint=str(pickled))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(KeyError, match="blocks.input.w"):
        create_target("vq", checkpoint=str(wrong))


# -------------------------------------------------------------------------------------- optical flow

@pytest.fixture(scope="module")
def raft_checkpoint(tmp_path_factory):
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("raft") / "raft_small.pth"
    torch.save(raft_small(weights=None, progress=False).state_dict(), path)
    return path


def test_optical_flow_target(clip, raft_checkpoint):
    target = create_target("optical_flow", checkpoint=str(raft_checkpoint), variant="raft_small", max_flow=1e9)
    assert target.spec.kind == "dense" and target.spec.channels == 2 and target.iterations == 12
    # RAFT's smallest input is 128 px: one real clip upscaled, for an exact alignment check
    video = nn.functional.interpolate(clip[1], size=(128, 128), mode="bilinear", align_corners=False)[None]
    out = check_target(target, video)
    assert out.value.shape == (1, T, 2, 128, 128)
    assert out.valid.tolist() == [[True, True, False]]  # the last frame has no successor
    assert out.value[:, -1].abs().sum() == 0 and out.value[:, :-1].abs().sum() > 0
    # alignment: frame t holds the flow t -> t+1
    with torch.no_grad():
        first, second = ((to_unit_range(video[0, i])[None] * 2 - 1).clamp(-1, 1) for i in (1, 2))
        expected = target.raft(first, second, num_flow_updates=12)[-1][0]
    assert torch.allclose(out.value[0, 1], expected, atol=1e-4)


def test_optical_flow_small_frames_and_large_motion(clip, raft_checkpoint):
    """64 px frames run upscaled to 128 inside the target; a max_flow of 0 drops every pair."""
    target = create_target("optical_flow", checkpoint=str(raft_checkpoint), variant="raft_small", max_flow=1e9)
    small = target.compute(clip[:1, :2])
    assert small.value.shape == (1, 2, 2, SIZE, SIZE) and small.valid.tolist() == [[True, False]]
    target.max_flow = 0.0
    out = target.compute(clip[:1, :2])
    assert not out.valid.any() and out.value.abs().sum() == 0
    pred = torch.randn(out.value.shape, requires_grad=True)
    loss = mvm_loss(pred, out, torch.ones(1, 2, *GRID, dtype=torch.bool), target.spec)
    loss.backward()
    assert loss.item() == 0 and pred.grad.abs().sum() == 0


def test_optical_flow_rejects_wrong_variant_weights(raft_checkpoint):
    with pytest.raises(KeyError, match="raft_large"):
        create_target("optical_flow", checkpoint=str(raft_checkpoint), variant="raft_large")


# --------------------------------------------------------------------------------------------- depth

def test_depth_target(clip, tmp_path):
    from transformers import DPTConfig, DPTForDepthEstimation

    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                       neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(config).save_pretrained(tmp_path / "dpt")
    target = create_target("depth", model_dir=str(tmp_path / "dpt"))
    assert target.spec.kind == "dense" and target.spec.channels == 1
    out = check_target(target, clip)
    assert out.value.shape == (B, T, 1, SIZE, SIZE)
    assert out.value.min() >= 0 and out.value.max() <= 1
    # alignment: frame (0, 1) through DPT directly (0.5/0.5 normalisation), min-max scaled
    with torch.no_grad():
        raw = target.dpt(pixel_values=(to_unit_range(clip[0, 1])[None] - 0.5) / 0.5).predicted_depth[0]
    expected = (raw - raw.min()) / (raw.max() - raw.min())
    assert torch.allclose(out.value[0, 1, 0], expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------- CLIP

def test_clip_feature_target(clip, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    target = create_target("2d_clip_feature", model_dir=str(tmp_path / "clip"))
    assert target.spec.kind == "feature" and target.spec.channels == 32
    out = check_target(target, clip)
    assert out.value.shape == (B, T, *GRID, 32)
    # alignment: 8x8 CLIP patches at 64 px; VT token (0, 1) = mean of CLIP patches rows 0-3, cols 4-7
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    with torch.no_grad():
        hidden = target.clip(pixel_values=((to_unit_range(clip[1, 0]) - mean) / std)[None],
                             interpolate_pos_encoding=True).last_hidden_state[0, 1:].reshape(8, 8, 32)
    assert torch.allclose(out.value[1, 0, 0, 1], hidden[0:4, 4:8].mean(dim=(0, 1)), atol=1e-5)


# ------------------------------------------------------------------------------------------- 2D Swin

def test_2d_feature_target_transformers(clip, tmp_path):
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    config = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                        window_size=2)
    SwinModel(config).save_pretrained(tmp_path / "swin")
    target = create_target("2d_feature", model_dir=str(tmp_path / "swin"))
    assert target.spec.channels == 128
    out = check_target(target, clip)
    assert out.value.shape == (B, T, *GRID, 128)
    # alignment: stride 32 = the VT stride, so last_hidden_state is row-major over the same 2x2 grid
    with torch.no_grad():
        hidden = target.swin(pixel_values=clip[0, 2][None]).last_hidden_state[0]
    assert torch.allclose(out.value[0, 2].reshape(4, 128), hidden, atol=1e-5)


def test_2d_feature_target_timm(clip, tmp_path):
    import timm

    torch.manual_seed(0)
    kwargs = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2, img_size=64)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, **kwargs)
    torch.save(model.state_dict(), tmp_path / "swin_timm.pth")  # with its classifier, as released
    target = create_target("2d_feature", timm_model="swin_tiny_patch4_window7_224",
                           checkpoint=str(tmp_path / "swin_timm.pth"), timm_kwargs=kwargs)
    out = check_target(target, clip)
    assert out.value.shape == (B, T, *GRID, 128)
    with torch.no_grad():
        expected = model.eval().forward_features(clip[1, 1][None])[0]
    assert torch.allclose(out.value[1, 1], expected, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one teacher"):
        create_target("2d_feature")


# ---------------------------------------------------------------------------------------- Video Swin

def test_3d_feature_target(clip, tmp_path):
    from violet_ds.models.video_swin import build_video_swin

    torch.manual_seed(0)
    overrides = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(2, 2, 2),
                     temporal_stride=2, drop_path_rate=0.0)
    swin = build_video_swin("tiny", **overrides).eval()
    # the official Kinetics layout: backbone under `backbone.`, a classifier `cls_head.*`, wrapped
    state = {f"backbone.{k}": v for k, v in swin.state_dict().items()}
    state["cls_head.fc_cls.weight"] = torch.zeros(400, 128)
    torch.save({"state_dict": state}, tmp_path / "swin_kinetics.pth")
    target = create_target("3d_feature", checkpoint=str(tmp_path / "swin_kinetics.pth"), variant="tiny",
                           swin_overrides={k: v for k, v in overrides.items() if k != "temporal_stride"})
    assert target.spec.channels == 128
    out = check_target(target, clip)
    assert out.value.shape == (B, T, *GRID, 128)
    with torch.no_grad():
        direct = swin(clip.transpose(1, 2))  # (B, 2, 2, 2, 128): tubelets {0, 1} and {2, pad}
    assert direct.shape[1] == 2
    assert torch.allclose(out.value[:, 0], direct[:, 0], atol=1e-5)
    assert torch.allclose(out.value[:, 1], direct[:, 0], atol=1e-5)
    assert torch.allclose(out.value[:, 2], direct[:, 1], atol=1e-5)


# ------------------------------------------------------------------------------------- dtype/device

def test_teacher_runs_in_training_dtype(clip, tmp_path):
    from violet_ds.targets.vq import DalleEncoder

    torch.save(DalleEncoder(n_hid=8, blocks_per_group=1, vocab_size=32).state_dict(), tmp_path / "e.pt")
    target = create_target("vq", checkpoint=str(tmp_path / "e.pt")).to("cpu", "bf16")
    assert all(p.dtype == torch.bfloat16 for p in target.encoder.parameters())
    out = target.compute(clip.bfloat16())
    assert out.value.dtype == torch.long and out.value.max() < 32


def test_2d_feature_teacher_matches_the_official_listing(state_dict_listings):
    """Our Swin-B teacher config has exactly the keys/shapes of VIOLETv2's `feature_model.*` teacher."""
    import json

    from transformers import SwinConfig, SwinModel

    from violet_ds.targets.feat2d import SWIN_B_CONFIG

    listing = json.loads((state_dict_listings / "empirical_mvm_pretrain_2d_feature.json").read_text())
    official = {k[len("feature_model."):]: tuple(v) for k, v in listing["tensors"].items()
                if k.startswith("feature_model.")}
    with torch.device("meta"):
        swin = SwinModel(SwinConfig(**SWIN_B_CONFIG))
    ours = {k: tuple(v.shape) for k, v in swin.state_dict().items()}
    assert ours == official
    assert sum(p.numel() for p in swin.parameters()) == listing["param_counts_unique"]["teacher"]
