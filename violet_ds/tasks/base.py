"""The task contract: what every training objective gives the commands and the engine.

A task is an `nn.Module` around a backbone, built by `violet_ds.tasks.create_task(name, model, cfg,
tokenizer)`. Every task shares `Task.__init__`: it stores the backbone (`self.model`), the TaskConfig
(`self.cfg`), the tokenizer and an empty `self.heads`, then calls `build()`, where a task checks its
configuration and creates its heads. A task overrides `forward` and the evaluation hooks; every other
hook has a default that fits a task without that feature, so the engine and the commands call the
hooks of any task without asking whether it has them.

The engine never imports this module: it calls these methods on whatever module it is handed.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from violet_ds.data.loaders import build_split


class Task(nn.Module):
    """Base class of every task; subclasses are registered with `@TASKS.register("name")`."""

    # the generic dataset of the task's splits: a `violet_ds.data.datasets` class (see `build_datasets`)
    dataset_class: Optional[type] = None
    # False for a task that reads only pre-extracted tokens (`source.vq`), never the frame TSV: the run's
    # preflight then checks the token files instead of the frames
    reads_frames: bool = True

    def __init__(self, model: nn.Module, cfg, tokenizer=None, *, tie_mlm_head: bool = False,
                 clip: Optional[Mapping[str, int]] = None):
        """`model`: the backbone (`create_model`); `cfg`: the run's TaskConfig; `tokenizer`: the run's
        tokenizer (VIMPAC's token inputs need none); `tie_mlm_head` (the run's `model.tie_mlm_head`): an
        MLM head shares its decoder weight with the word embeddings; `clip`: the clip settings a model
        directory records (num_frames, image_size, max_text_len), for inference on raw videos."""
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tie_mlm_head = bool(tie_mlm_head)
        self.clip: Dict[str, int] = dict(clip or {})
        self.heads = nn.ModuleDict()
        # tasks this one combines (multitask), by key; a plain dict, their modules are registered here
        self.subtasks: Dict[str, Task] = {}
        self.last_predictions: List[Dict[str, Any]] = []
        self.build()

    def build(self) -> None:
        """Check `self.cfg` and create the heads (in `self.heads`, under the standard names of
        `violet_ds.models.heads`) and buffers. Called once, at the end of `__init__`."""

    # ------------------------------------------------------------------ training
    def forward(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """A collated batch -> `{"loss": scalar tensor, ...}`; every other scalar is logged as it is."""
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def frozen_modules(self) -> List[nn.Module]:
        """Teacher modules that must stay out of the optimizer and the checkpoints."""
        return []

    def move_teachers(self, device: torch.device, dtype: Union[str, torch.dtype, None]) -> None:
        """Move teachers kept outside the module tree (MVM targets) to `device`, in the run's `dtype`
        (a torch dtype or a precision name: fp32, bf16, fp16)."""

    def set_step(self, step: int) -> None:
        """Optimizer steps done so far, given by the trainer before each training micro-batch (for objectives
        that change with the step, e.g. pretraining's `mlm_start_step`); ignored by default."""

    def chance_losses(self) -> Dict[str, float]:
        """`{output term: loss of scores collapsed to one constant}` for the trainer's stall detector."""
        return {}

    def visualize(self, batch: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
        """Images `(3, H, W)` in [0, 1] for TensorBoard, one tag per labelled panel; none by default."""
        return {}

    # ------------------------------------------------------------------ data
    def build_datasets(self, data_cfg, tokenizer, split: str) -> Dict[str, Dataset]:
        """`{name: dataset}` of `data_cfg.<split>`; evaluation gets one loader per entry.

        The default is one `dataset_class` per source (`violet_ds.data.loaders.build_split`); a task
        whose data has another shape (two-clip VQ tokens, texts and videos apart) overrides this.
        """
        if self.dataset_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no dataset_class and does not override "
                                      "build_datasets")
        return build_split(self.dataset_class, data_cfg, tokenizer, split)

    # ------------------------------------------------------------------ evaluation
    def evaluate_step(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """Per-sample outputs of one batch (tensors along dim 0 or lists; `index` for deduplication)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate_step")

    def evaluate_end(self, outputs: Sequence[Mapping[str, Any]], world) -> Dict[str, float]:
        """Metrics from every `evaluate_step` output of this rank; gathering across ranks goes through
        `world` (`violet_ds.engine.evaluator.gather_outputs`)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate_end")

    def evaluate_full(self, loaders: Mapping[str, Any], world,
                      max_batches: Optional[int] = None) -> Optional[Dict[str, float]]:
        """Metrics of a task that evaluates its loaders itself (e.g. a full retrieval score matrix);
        None (the default) lets the engine run `evaluate_step` / `evaluate_end` over each loader."""
        return None

    def predictions(self) -> List[Dict[str, Any]]:
        """Per-sample predictions of the last evaluation (rows of `predictions_<split>.jsonl`)."""
        return list(self.last_predictions)

    # ------------------------------------------------------------------ export
    def portable_options(self) -> Dict[str, Any]:
        """`cfg.options` with every file-backed value replaced by what the task read from the file, so a
        model directory names no file of the machine that wrote it."""
        return copy.deepcopy(dict(self.cfg.options or {}))

    def answer_vocab(self) -> Optional[List[str]]:
        """The answers of an open-ended task (index -> text), else None."""
        return None
