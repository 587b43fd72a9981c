"""Zero-shot evaluation: a downstream task answered by the pretraining heads, with no finetuning.

`violet-ds evaluate --task.name zero_shot --task.options '{task: retrieval}' --run.init_from <pretraining run>`

- LAVENDER (`head_style: mlm`): every task through the pretrained MLM head: retrieval and multiple
  choice as "true"/"false" at [MASK] (the VTM-as-MLM of pretraining), open-ended QA / fill-in-the-blank /
  action classification as the answer word at [MASK], captioning by [MASK] decoding.
- VIOLET / VIOLETv2 (`head_style: head`): retrieval and multiple choice through the pretrained VTM
  score head (`heads.score`); tasks that need a new classifier (open-ended QA with an answer head,
  action classification) have no zero-shot form in this style and are refused.

The wrapped task is built exactly as for finetuning (same datasets, metrics and predictions); its
model and heads are registered here under the same names (`model.*`, `heads.*`), so the pretraining
checkpoint's weights land in them. Evaluating heads the checkpoint did not provide would score random
weights: that is an error naming the heads.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Dict, List, Optional

from violet_ds.engine.evaluator import to_device
from violet_ds.registry import TASKS
from violet_ds.tasks.base import Task
from violet_ds.tasks.common import parse_options


ZERO_SHOT_STYLES = {"retrieval": ("head", "mlm"), "qa_mc": ("head", "mlm"), "qa_oe": ("mlm",),
                    "caption": ("mlm",), "action_cls": ("mlm",)}


@TASKS.register("zero_shot")
class ZeroShot(Task):
    """Evaluation-only wrapper of a downstream task with pretrained heads."""

    option_defaults: Dict[str, Any] = {"task": None, "task_options": {}}

    def build(self) -> None:
        cfg = self.cfg
        self.options = parse_options(cfg.name, cfg.options, self.option_defaults)
        inner_name = self.options["task"]
        if inner_name not in ZERO_SHOT_STYLES:
            raise ValueError(f"task zero_shot: options.task must be one of {sorted(ZERO_SHOT_STYLES)}, got {inner_name!r}")
        if cfg.head_style not in ZERO_SHOT_STYLES[inner_name]:
            raise ValueError(f"task zero_shot: {inner_name} has no zero-shot form with head_style {cfg.head_style!r} "
                             f"(a new head would be random); use {ZERO_SHOT_STYLES[inner_name]}")
        inner_cfg = dataclasses.replace(cfg, name=inner_name, options=copy.deepcopy(self.options["task_options"]))
        inner = TASKS.create(inner_name, model=self.model, cfg=inner_cfg, tokenizer=self.tokenizer,
                             tie_mlm_head=self.tie_mlm_head)
        self.heads = inner.heads
        # a plain attribute: the inner task's modules are registered here (model, heads)
        object.__setattr__(self, "inner", inner)
        self.loaded_heads: set = set()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name, buffer in self.inner._buffers.items():
            if buffer is not None:
                self.inner._buffers[name] = fn(buffer)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self.inner.training = mode
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # remember which head weights came from the checkpoint: the others would be random
        self.loaded_heads |= {key for key in state_dict if key.startswith("heads.")}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def missing_heads(self) -> List[str]:
        """Head parameters the loaded checkpoint did not provide."""
        # an unused (frozen) LAVENDER task-token table is not needed to evaluate
        unused = set() if self.inner.task_token else {"heads.task_embedding.weight"}
        return sorted(key for key in self.state_dict()
                      if key.startswith("heads.") and key not in self.loaded_heads and key not in unused)

    def _check_heads(self) -> None:
        missing = self.missing_heads()
        if missing:
            raise ValueError(f"zero-shot {self.options['task']}: the weights given (run.init_from) have no "
                             f"{missing[:6]}; zero-shot evaluation needs the pretraining heads "
                             f"({'LAVENDER MLM head' if 'heads.mlm' in ' '.join(missing) else 'VTM score head'})")

    def forward(self, batch: Dict[str, Any]):
        raise RuntimeError("task zero_shot only evaluates (violet-ds evaluate); finetune with the task itself")

    def build_datasets(self, data_cfg, tokenizer, split: str) -> Dict[str, Any]:
        return self.inner.build_datasets(data_cfg, tokenizer, split)

    def evaluate_full(self, loaders: Dict[str, Any], world, max_batches: Optional[int] = None) -> Dict[str, float]:
        self._check_heads()
        full = self.inner.evaluate_full(loaders, world, max_batches=max_batches)
        if full is not None:
            return full

        device = next(self.model.parameters()).device
        metrics: Dict[str, float] = {}
        for position, (name, loader) in enumerate(loaders.items()):
            outputs = [self.inner.evaluate_step(to_device(batch, device))
                       for batch in itertools.islice(loader, max_batches)]
            prefix = "" if position == 0 else f"{name}/"
            metrics.update({f"{prefix}{k}": float(v) for k, v in self.inner.evaluate_end(outputs, world).items()})
        return metrics

    def predictions(self) -> List[Dict[str, Any]]:
        return self.inner.predictions()

    def portable_options(self) -> Dict[str, Any]:
        options = super().portable_options()
        if isinstance(options.get("task_options"), dict):
            options["task_options"] = self.inner.portable_options()
        return options

    def answer_vocab(self) -> Optional[List[str]]:
        return self.inner.answer_vocab()
