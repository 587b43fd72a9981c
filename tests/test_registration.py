"""A new MVM target or task is one new file: the package finds it, the registry builds it by name.

Each test writes a throwaway module into a temporary folder, adds that folder to the package's
`__path__` and runs the package's own discovery (`violet_ds.registry.import_submodules`), then
builds the new entry by name and runs it through the code path training uses. Registries,
`__path__` and `sys.modules` are restored afterwards.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import violet_ds.targets
import violet_ds.tasks
from violet_ds.config import ModelConfig, TaskConfig
from violet_ds.data.tokenizer import Tokenizer
from violet_ds.registry import TARGETS, TASKS, import_submodules

TARGET_FILE = '''
"""Throwaway MVM target: the grey level of each pixel (dense, one channel)."""

from violet_ds.registry import TARGETS
from violet_ds.targets.base import Target, TargetOutput, TargetSpec


@TARGETS.register("zz_grey")
class GreyTarget(Target):
    name = "zz_grey"

    def __init__(self, patch: int = 32, loss: str = "l1"):
        super().__init__(patch)
        self.spec = TargetSpec("dense", 1, loss)

    def _compute(self, video):
        return TargetOutput(video.mean(dim=2, keepdim=True))
'''

TASK_FILE = '''
"""Throwaway task: regress the number of text tokens from the pooled output of the pair."""

from violet_ds.registry import TASKS
from violet_ds.tasks.common import DownstreamTask, encode_video, fuse_pairs, pooled_of


@TASKS.register("zz_text_length")
class TextLength(DownstreamTask):
    head_styles = ("head",)

    def build(self):
        super().build()
        self.heads["score"] = self._score_head(1)

    def forward(self, batch):
        video_tokens, video_mask = encode_video(self.model, batch["video"])
        text_ids, text_mask = batch["text_ids"].to(video_tokens.device), batch["text_mask"].to(video_tokens.device)
        hidden = fuse_pairs(self.model, video_tokens, video_mask, text_ids, text_mask)
        score = self.heads["score"](pooled_of(hidden, video_tokens.shape[1])).squeeze(-1)
        return {"loss": (score - text_mask.sum(dim=1).float()).pow(2).mean()}
'''

WORDS = ["a", "red", "blue", "circle", "square", "moves", "left", "right"]


def _discover(monkeypatch, tmp_path, package, registry, module_name: str, source: str):
    """Write `source` as `<tmp>/<module_name>.py`, put the folder on `package.__path__`, run discovery."""
    folder = tmp_path / package.__name__.rsplit(".", 1)[-1]
    folder.mkdir()
    (folder / f"{module_name}.py").write_text(textwrap.dedent(source))
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    # a copy of the table: monkeypatch puts the original (without the new entry) back afterwards
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))
    importlib.invalidate_caches()
    return import_submodules(package.__name__)


@pytest.fixture
def forget_modules():
    names = []
    yield names
    for name in names:
        sys.modules.pop(name, None)
        package, _, attribute = name.rpartition(".")
        if hasattr(sys.modules[package], attribute):
            delattr(sys.modules[package], attribute)


@pytest.fixture
def tokenizer(tmp_path) -> Tokenizer:
    folder = tmp_path / "vocab"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return Tokenizer(folder)


def test_a_new_target_is_one_file(monkeypatch, tmp_path, forget_modules, tokenizer):
    from violet_ds.targets import create_targets, list_targets

    forget_modules.append("violet_ds.targets.zz_grey")
    found = _discover(monkeypatch, tmp_path, violet_ds.targets, TARGETS, "zz_grey", TARGET_FILE)
    assert "zz_grey" in found and "zz_grey" in list_targets()

    torch.manual_seed(0)
    video = torch.randn(2, 2, 3, 64, 64)
    mix = create_targets({"zz_grey": 1.0})
    outputs = mix.compute(video)
    assert outputs["zz_grey"].value.shape == (2, 2, 1, 64, 64)
    token_mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    token_mask[:, 0, 0, 0] = True  # the top-left 32x32 patch of each first frame
    prediction = torch.zeros(2, 2, 1, 64, 64)
    loss, parts = mix.loss({"zz_grey": prediction}, outputs, token_mask)
    expected = video[:, 0, :, :32, :32].mean(dim=1).abs().mean()
    assert torch.allclose(loss, expected) and set(parts) == {"zz_grey"}

    # and pretraining takes it by name, with a head for its layout
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    model = build_model(ModelConfig(name="violet-tiny", overrides={"vocab_size": 64, "max_frames": 4}))
    task = create_task("pretrain", model, TaskConfig(loss_weights={"mvm": 1.0}, mvm_targets={"zz_grey": 1.0}),
                       tokenizer)
    ids, mask = tokenizer.encode(["a red circle", "a blue square"], 8)
    out = task({"video": torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8), "text_ids": ids,
                "text_mask": mask})
    assert torch.isfinite(out["loss"]) and task.heads["mvm"].channels == 1


def test_a_new_task_is_one_file(monkeypatch, tmp_path, forget_modules, tokenizer):
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task, list_tasks

    forget_modules.append("violet_ds.tasks.zz_text_length")
    found = _discover(monkeypatch, tmp_path, violet_ds.tasks, TASKS, "zz_text_length", TASK_FILE)
    assert "zz_text_length" in found and "zz_text_length" in list_tasks()

    torch.manual_seed(0)
    model_cfg = ModelConfig(name="violet-tiny", overrides={"vocab_size": 64, "max_frames": 4})
    task = create_task("zz_text_length", build_model(model_cfg), TaskConfig(name="zz_text_length"), tokenizer,
                       tie_mlm_head=model_cfg.tie_mlm_head)
    ids, mask = tokenizer.encode(["a red circle moves left", "a square"], 8)
    batch = {"video": torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8), "text_ids": ids,
             "text_mask": mask}
    out = task(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert task.heads["score"][3].weight.grad is not None
    # what the task did not write comes from the contract's defaults
    assert task.frozen_modules() == [] and task.visualize(batch) == {} and task.predictions() == []
    assert task.evaluate_full({}, None) is None and task.chance_losses() == {}
