"""Multi-task finetuning (LAVENDER): several downstream tasks in one run on one shared backbone.

Configuration (`task.options`):
```yaml
task:
  name: multitask
  head_style: mlm                  # default for the sub-tasks
  options:
    seed: 0                        # with the step number, picks the task of each step
    exclude_splits: [test]         # videos of these splits (of every task) never appear in training
    tasks:
      - {task: qa_oe, key: msvd_qa, train: [0], val: [0], test: [0], weight: 1.0,
         options: {answer_vocab: data/txt_msvd-qa.json}}
      - {task: retrieval, key: msrvtt_ret, train: [1], val: [1], test: [1]}
```
`train` / `val` / `test` list indices into `data.train` / `data.val` / `data.test`. Optional per task:
`head_style`, `options`, `num_answers`, `num_options`, `num_classes`, `weight` (sampling weight).

One task per step: at training step s every rank draws the task from a generator seeded with
(seed, s), so all ranks run the same task with the same heads (no rank waits on gradients another
rank never produces). The step counter is a persistent buffer, so it is saved in checkpoints and a
resumed run continues the same task sequence. Each training item holds one sample of every task
(`<key>/<field>` keys): the engine's sampler and loader are task-agnostic, so the chosen task's
sub-batch is always at hand; the cost is loading K samples per item (see the module report).

Heads: the MLM head is one module shared by every sub-task (LAVENDER's single interface, key
`heads.mlm`, loadable from a LAVENDER pretraining checkpoint); other heads are per task,
`heads.<key>_<head>`. Heads a step does not use enter the loss with weight 0 so every parameter gets a
gradient on every step and rank.

Evaluation: every task on its own split datasets, metrics prefixed `<key>/`, plus `mean_main`, the
mean of each task's main metric.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, Dict, List, Mapping, Optional, Set

import torch

from violet_ds.data import annotations as ann
from violet_ds.data.datasets import MixedDataset
from violet_ds.engine.evaluator import to_device
from violet_ds.registry import TASKS
from violet_ds.tasks.base import Task
from violet_ds.tasks.common import parse_options


MAIN_METRIC = {"qa_mc": "acc", "qa_oe": "acc", "action_cls": "acc", "retrieval": "t2v_R@1", "caption": "CIDEr"}
SPEC_KEYS = {"task", "key", "train", "val", "test", "weight", "head_style", "options", "num_answers", "num_options",
             "num_classes"}


def annotation_videos(path: str, split: str) -> Set[str]:
    """Video ids named by an annotation file's split, whatever its official format."""
    kind, loaded = ann.load_any(path, split)
    records = loaded.records if hasattr(loaded, "records") else loaded
    return {record.video for record in records}


def filter_videos(dataset, banned: Set[str]):
    """Drop the records of `banned` videos from a dataset (or each part of a mix); returns the dataset."""
    if isinstance(dataset, MixedDataset):
        weights = [length / max(1, len(part)) for length, part in zip(dataset.lengths, dataset.datasets)]
        parts = [filter_videos(part, banned) for part in dataset.datasets]
        return MixedDataset(parts, weights)
    if not hasattr(dataset, "records"):
        raise TypeError(f"multitask: cannot filter test videos out of {type(dataset).__name__} (no records)")
    dataset.records = [r for r in dataset.records if r.video not in banned]
    if not dataset.records:
        raise ValueError(f"multitask: {getattr(dataset, 'annotation_path', type(dataset).__name__)} has no training "
                         "records left once the test videos of every task are removed")
    return dataset


class MultiTaskDataset(torch.utils.data.Dataset):
    """Item i = one sample of every task (task k's sample `i mod len_k`), keys prefixed `<key>/`."""

    def __init__(self, datasets: Mapping[str, Any]):
        self.datasets = dict(datasets)
        self.length = max(len(d) for d in self.datasets.values())

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, Any]:
        item: Dict[str, Any] = {"index": index}
        for key, dataset in self.datasets.items():
            sample = dataset[index % len(dataset)]
            item.update({f"{key}/{field}": value for field, value in sample.items()})
        return item


@TASKS.register("multitask")
class MultiTask(Task):
    """Several registered tasks over one backbone; one task per training step."""

    option_defaults: Dict[str, Any] = {"tasks": None, "seed": 0, "exclude_splits": ["test"]}

    def build(self) -> None:
        cfg = self.cfg
        self.options = parse_options(cfg.name, cfg.options, self.option_defaults)
        specs = self.options["tasks"]
        if not isinstance(specs, list) or not specs:
            raise ValueError("task multitask: options.tasks must be a non-empty list of {task, train, val, test, ...}")
        self.specs: Dict[str, Dict[str, Any]] = {}
        subtasks: Dict[str, Task] = {}
        for number, spec in enumerate(specs):
            unknown = sorted(set(spec) - SPEC_KEYS)
            if unknown or "task" not in spec:
                raise ValueError(f"task multitask: options.tasks[{number}] needs 'task'; unknown keys {unknown}; "
                                 f"known: {sorted(SPEC_KEYS)}")
            if spec["task"] in ("multitask", "zero_shot", "pretrain"):
                raise ValueError(f"task multitask: options.tasks[{number}] cannot be {spec['task']!r}")
            key = str(spec.get("key", spec["task"]))
            if key in subtasks or "." in key or "/" in key:
                raise ValueError(f"task multitask: task key {key!r} is repeated or has '.' or '/' (set a unique 'key')")
            sub_cfg = dataclasses.replace(
                cfg, name=spec["task"], head_style=spec.get("head_style", cfg.head_style),
                options=copy.deepcopy(spec.get("options", {})), num_answers=spec.get("num_answers", cfg.num_answers),
                num_options=spec.get("num_options", cfg.num_options), num_classes=spec.get("num_classes", cfg.num_classes))
            sub = TASKS.create(spec["task"], model=self.model, cfg=sub_cfg, tokenizer=self.tokenizer,
                               tie_mlm_head=self.tie_mlm_head)
            for head_name in list(sub.heads.keys()):
                if head_name in ("mlm", "task_embedding"):
                    # one answer interface (and one LAVENDER task-token table) for every task
                    if head_name in self.heads:
                        sub.heads[head_name] = self.heads[head_name]
                    else:
                        self.heads[head_name] = sub.heads[head_name]
                else:
                    self.heads[f"{key}_{head_name}"] = sub.heads[head_name]
            subtasks[key] = sub
            self.specs[key] = {"task": spec["task"], "weight": float(spec.get("weight", 1.0)),
                               **{split: list(spec.get(split, [])) for split in ("train", "val", "test")}}
            if self.specs[key]["weight"] < 0:
                raise ValueError(f"task multitask: task {key!r} has a negative weight")
        # a plain dict: the sub-tasks' modules are registered once, here (model, heads)
        self.subtasks = subtasks
        self.keys = list(subtasks)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ module plumbing
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # sub-task buffers (answer ids, prompts) follow the device of the shared modules
        for sub in self.subtasks.values():
            for name, buffer in sub._buffers.items():
                if buffer is not None:
                    sub._buffers[name] = fn(buffer)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for sub in self.subtasks.values():
            sub.training = mode
        return self

    # ------------------------------------------------------------------ task of a step
    def task_of_step(self, step: int) -> str:
        """The task of training step `step`: a function of (options.seed, step) only, same on every rank."""
        generator = torch.Generator()
        generator.manual_seed(int(self.options["seed"]) * 1_000_003 + int(step))
        weights = torch.tensor([self.specs[k]["weight"] for k in self.keys], dtype=torch.float64)
        if float(weights.sum()) <= 0:
            raise ValueError("task multitask: every task weight is 0")
        return self.keys[int(torch.multinomial(weights, 1, generator=generator))]

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        key = self.task_of_step(int(self.steps_done))
        if self.training:
            self.steps_done += 1
        prefix = f"{key}/"
        sub_batch = {name[len(prefix):]: value for name, value in batch.items() if name.startswith(prefix)}
        if not sub_batch:
            raise KeyError(f"multitask: the batch has no fields of task {key!r} (keys {sorted(batch)[:8]})")
        out = self.subtasks[key](sub_batch)
        used = {id(p) for p in self.subtasks[key].heads.parameters()}
        idle = [p for p in self.heads.parameters() if id(p) not in used and p.requires_grad]
        loss = out["loss"]
        if idle:
            loss = loss + 0.0 * sum(p.sum() for p in idle).to(loss.dtype)
        result = {"loss": loss}
        result.update({f"{key}/{name}": value.detach() for name, value in out.items()
                       if isinstance(value, torch.Tensor) and value.numel() == 1})
        return result

    # ------------------------------------------------------------------ data
    def _sources(self, data_cfg, key: str, split: str):
        sources = data_cfg.sources(split)
        picked = []
        for position in self.specs[key][split]:
            if not 0 <= int(position) < len(sources):
                raise IndexError(f"multitask: task {key!r} names data.{split}[{position}], but data.{split} has "
                                 f"{len(sources)} sources")
            picked.append(sources[int(position)])
        return picked

    def excluded_videos(self, data_cfg) -> Set[str]:
        """Videos of the `exclude_splits` sources of every task (removed from every training set)."""
        banned: Set[str] = set()
        for key in self.keys:
            for split in self.options["exclude_splits"]:
                for source in self._sources(data_cfg, key, split):
                    banned |= annotation_videos(source.annotations, source.split)
        return banned

    def build_datasets(self, data_cfg, tokenizer, split: str) -> Dict[str, Any]:
        """Training: one `MultiTaskDataset` over every task's training data (test videos removed);
        evaluation: each task's datasets, named `<key>/<name>`."""
        built: Dict[str, Any] = {}
        banned = self.excluded_videos(data_cfg) if split == "train" else set()
        for key in self.keys:
            sources = self._sources(data_cfg, key, split)
            if not sources:
                if split == "train":
                    raise ValueError(f"multitask: task {key!r} has no training source (options.tasks[].train)")
                continue
            sub_data = dataclasses.replace(data_cfg, **{split: sources})
            parts = self.subtasks[key].build_datasets(sub_data, tokenizer, split)
            if split == "train":
                built[key] = filter_videos(next(iter(parts.values())), banned)
            else:
                built.update({f"{key}/{name}": dataset for name, dataset in parts.items()})
        if split == "train":
            return {"train": MultiTaskDataset(built)}
        return built

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_full(self, loaders: Dict[str, Any], world, max_batches: Optional[int] = None) -> Dict[str, float]:
        """Each task on its own loaders (`<key>/<name>`); metrics `<key>/<metric>` and `mean_main`."""
        device = next(self.model.parameters()).device
        metrics: Dict[str, float] = {}
        mains = []
        predictions = []
        for key in self.keys:
            prefix = f"{key}/"
            own = {name[len(prefix):]: loader for name, loader in loaders.items() if name.startswith(prefix)}
            if not own:
                continue
            sub = self.subtasks[key]
            result = sub.evaluate_full(own, world, max_batches=max_batches)
            if result is None:
                result = {}
                for name, loader in own.items():
                    outputs = [sub.evaluate_step(to_device(batch, device))
                               for batch in itertools.islice(loader, max_batches)]
                    result.update(sub.evaluate_end(outputs, world))
            metrics.update({f"{key}/{name}": float(value) for name, value in result.items()})
            main = MAIN_METRIC.get(self.specs[key]["task"])
            if main in result:
                mains.append(float(result[main]))
            predictions.extend({"task": key, **row} for row in sub.predictions())
        if mains:
            metrics["mean_main"] = sum(mains) / len(mains)
        self.last_predictions = predictions
        return metrics

    # ------------------------------------------------------------------ export
    def portable_options(self) -> Dict[str, Any]:
        options = super().portable_options()
        # each sub-task's options, made portable by the sub-task built for that entry
        options["tasks"] = [{**spec, "options": sub.portable_options()}
                            for spec, sub in zip(options["tasks"], self.subtasks.values())]
        return options

    def answer_vocab(self) -> Optional[List[str]]:
        """The answers of the first open-ended sub-task."""
        return next((sub.answer_vocab() for sub in self.subtasks.values() if sub.answer_vocab() is not None), None)
