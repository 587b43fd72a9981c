"""One pretraining step of violet-tiny with each MVM target (and a weighted mix) on real fixture frames.

Teachers are tiny random models saved in their real checkpoint formats. Each step checks: a finite
loss, the MVM head is trained, the teacher is untouched, frozen, and absent from the task's
parameters (hence the optimizer) and from its state dict (hence checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from violet_ds.config import TaskConfig

torch.set_num_threads(2)
B, T, SIZE = 2, 2, 64


def make_teacher(name: str, root: Path) -> Dict[str, Any]:
    """Save a tiny randomly initialised teacher for target `name` under `root`; return its options."""
    torch.manual_seed(0)
    if name == "vq":
        from violet_ds.targets.vq import DalleEncoder

        torch.save(DalleEncoder(n_hid=8, blocks_per_group=1, vocab_size=64).state_dict(), root / "dalle.pt")
        return {"checkpoint": str(root / "dalle.pt")}
    if name == "optical_flow":
        from torchvision.models.optical_flow import raft_small

        torch.save(raft_small(weights=None, progress=False).state_dict(), root / "raft_small.pth")
        return {"checkpoint": str(root / "raft_small.pth"), "variant": "raft_small", "max_flow": 1e9}
    if name == "depth":
        from transformers import DPTConfig, DPTForDepthEstimation

        config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                           image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                           neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                           reassemble_factors=[4, 2, 1, 0.5])
        DPTForDepthEstimation(config).save_pretrained(root / "dpt")
        return {"model_dir": str(root / "dpt")}
    if name == "2d_clip_feature":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(root / "clip")
        return {"model_dir": str(root / "clip")}
    if name == "2d_feature":
        from transformers import SwinConfig, SwinModel

        SwinModel(SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                             window_size=2)).save_pretrained(root / "swin")
        return {"model_dir": str(root / "swin")}
    if name == "3d_feature":
        from violet_ds.models.video_swin import build_video_swin

        overrides = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=(2, 2, 2))
        swin = build_video_swin("tiny", temporal_stride=2, **overrides)
        torch.save({"state_dict": {f"backbone.{k}": v for k, v in swin.state_dict().items()}}, root / "swin3d.pth")
        return {"checkpoint": str(root / "swin3d.pth"), "variant": "tiny", "swin_overrides": overrides}
    return {}


@pytest.fixture(scope="module")
def batch(official_dir, bert_dir):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.data.tsv import TSVFile
    from violet_ds.targets.extract import read_row_clip

    tsv = TSVFile(official_dir / "_tools" / "msrvtt.tsv")
    video = torch.stack([read_row_clip(tsv, row, num_frames=T, size=SIZE) for row in (0, 4)])
    ids, mask = Tokenizer(bert_dir).encode(["a man is cooking in a kitchen", "a cartoon dog runs"], max_len=12)
    return {"video": video, "text_ids": ids, "text_mask": mask}


def pretrain_task(bert_dir, weights: Dict[str, float], options: Dict[str, Dict[str, Any]]):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks.pretrain import PretrainTask

    torch.manual_seed(0)
    tokenizer = Tokenizer(bert_dir)
    model = create_model("violet-tiny", vocab_size=tokenizer.vocab_size, max_frames=4)
    cfg = TaskConfig(name="pretrain", loss_weights={"mlm": 1.0, "mvm": 1.0}, mvm_targets=weights,
                     mvm_strategies=["rm"], mvm_ratio=0.5, target_options=options)
    return PretrainTask(model, cfg, tokenizer)


def one_step(task, batch) -> Dict[str, torch.Tensor]:
    teachers = task.frozen_modules()
    teacher_before = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    heads_before = {k: v.clone() for k, v in task.heads.state_dict().items()}
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3)
    task.train()
    out = task(batch)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    optimizer.step()
    # the MVM head learned; teachers are untouched, in eval mode, outside the optimizer and state dict
    assert any(not torch.equal(heads_before[k], v) for k, v in task.heads.state_dict().items() if k.startswith("mvm"))
    own_params = {id(p) for p in task.parameters()}
    task_keys = set(task.state_dict())
    for teacher, before in zip(teachers, teacher_before, strict=True):
        assert not teacher.training
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert not any(id(p) in own_params for p in teacher.parameters())
        assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    teacher_tensors = {t.data_ptr() for teacher in teachers for t in teacher.state_dict().values()}
    assert not any(v.data_ptr() in teacher_tensors for v in task.state_dict().values())
    assert all(k.startswith(("model.", "heads.")) for k in task_keys)
    return out


@pytest.mark.parametrize("name", ["pixel", "hog", "vq", "optical_flow", "depth", "2d_feature", "2d_clip_feature",
                                  "3d_feature"])
def test_pretraining_step_with_target(name, batch, bert_dir, tmp_path):
    task = pretrain_task(bert_dir, {name: 1.0}, {name: make_teacher(name, tmp_path)} if name not in ("pixel", "hog")
                         else {})
    assert (len(task.frozen_modules()) > 0) == (name not in ("pixel", "hog"))
    out = one_step(task, batch)
    assert out["loss_mvm"] > 0


def test_pretraining_step_with_weighted_mix_and_pre_extracted_vq(batch, bert_dir, tmp_path):
    task = pretrain_task(bert_dir, {"hog": 0.5, "vq": 1.0, "2d_feature": 2.0},
                         {"hog": {"layout": "feature"}, "2d_feature": make_teacher("2d_feature", tmp_path)})
    assert set(task.heads) >= {"mvm", "mvm_vq", "mvm_2d_feature"}
    # vq without a checkpoint: the tokens come pre-extracted with the batch
    tokens = torch.randint(0, 8192, (B, T, SIZE // 32, SIZE // 32))
    out = one_step(task, dict(batch, vq_tokens=tokens))
    assert {"loss_mvm_hog", "loss_mvm_vq", "loss_mvm_2d_feature"} <= set(out)
    expected = 0.5 * out["loss_mvm_hog"] + out["loss_mvm_vq"] + 2.0 * out["loss_mvm_2d_feature"]
    assert torch.allclose(out["loss_mvm"], expected, rtol=1e-5)


@pytest.mark.slow
def test_cli_pretraining_checkpoint_holds_no_teacher(tmp_path, demo):
    """`violet-ds pretrain` with a 2D Swin teacher: DeepSpeed checkpoints carry no teacher tensors."""
    from engine_support import latest_tag, run_cli, tiny_config, write_config

    options = make_teacher("2d_feature", tmp_path)
    config = tiny_config(demo, tmp_path / "runs", "teacher", run__max_steps=2, run__save_every=2)
    config["task"].update(mvm_targets={"2d_feature": 1.0}, target_options={"2d_feature": options})
    run_cli(write_config(config, tmp_path / "run.yaml"), timeout=600)
    run_dir = tmp_path / "runs" / "teacher"
    tag = latest_tag(run_dir)
    assert tag is not None
    files = sorted((run_dir / "checkpoints" / tag).rglob("*.pt"))
    assert files
    from safetensors.torch import load_file

    teacher_shapes = {tuple(v.shape) for v in load_file(str(tmp_path / "swin" / "model.safetensors")).values()}
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    optimizer_names = set()
    for path in files:
        # DeepSpeed pickles a few of its own plain classes next to the tensors: allow exactly those
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            state = torch.load(path, map_location="cpu", weights_only=True)

        def walk(obj, where):
            if isinstance(obj, dict):
                for key, value in obj.items():
                    assert "swin.embeddings" not in str(key) and "feature_model" not in str(key), f"{where}{key}"
                    walk(value, f"{where}{key}.")
            elif isinstance(obj, (list, tuple)):
                for value in obj:
                    walk(value, where)

        walk(state, f"{path.name}: ")
        # the optimizer's parameters, by name: only the task's own
        for group in state.get("param_shapes", []) if isinstance(state, dict) else []:
            assert all(name.startswith(("model.", "heads.")) for name in group), path
            optimizer_names.update(group)
        module = state.get("module") if isinstance(state, dict) else None
        if module:
            assert all(k.startswith(("model.", "heads.")) for k in module), path
            # the tiny Swin's patch embedding (16, 3, 4, 4) has no twin among the task's tensors
            assert (16, 3, 4, 4) in teacher_shapes
            assert all(tuple(v.shape) != (16, 3, 4, 4) for v in module.values())
    assert any(name.startswith("heads.mvm") for name in optimizer_names)
