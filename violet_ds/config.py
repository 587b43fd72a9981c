"""Typed configuration of a training or evaluation run.

The training commands take one parameter per dataclass below, so a YAML file has the top-level keys
`model`, `data`, `task`, `optim`, `engine`, `run`, and every key and type is validated by jsonargparse
before any heavy work starts. Task-specific options that only one task understands live in
`task.options`; each task validates that dictionary itself and names any key it does not know.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import numbers
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Mapping, Optional, Tuple


@dataclass
class ModelConfig:
    """Which network to build and how to initialise it."""

    name: str = "violet-tiny"
    """registered model name (`violet-ds list-models`)"""
    weights: Optional[str] = None
    """initial backbone weights: a violet_ds safetensors file, a model directory, an official checkpoint (.pt), or a
    run / checkpoints / tag directory (its consolidated fp32 weights); a task file's heads are left out"""
    pretrained_swin: Optional[str] = None
    """Video Swin Kinetics checkpoint or timm 2D Swin state dict to initialise the video encoder"""
    text_config_dir: Optional[str] = None
    """local Hugging Face BERT directory whose config (and weights) build the text/cross-modal part"""
    tie_mlm_head: bool = False
    """tie the MLM decoder to the word embeddings (BERT default); the official code does not"""
    grad_checkpointing: bool = False
    """checkpoint every video-encoder and cross-modal block (recompute in backward)"""
    offload_activations: bool = False
    """keep the video encoder's saved activations on the CPU (with grad_checkpointing)"""
    compile: bool = False
    """torch.compile every transformer block in place (regional compilation; first steps pay the compile time)"""
    video_attention: str = "auto"
    """Video Swin window-attention kernel: auto (explicit on CPU, sdpa on CUDA), sdpa, explicit, or flex (FlexAttention; CUDA for training)"""
    overrides: Dict[str, Any] = field(default_factory=dict)
    """extra keyword arguments for create_model (e.g. drop_path, max_frames)"""


@dataclass
class DataSource:
    """One dataset: TSV frame shards + an annotation file."""

    tsv: str
    """TSV path, glob or comma-separated list of shards"""
    annotations: str
    """annotation JSON in the official format of the task"""
    split: str = "train"
    """which split of the annotation file to read (train, val, test)"""
    kind: Literal["video", "image"] = "video"
    """`image`: one-frame rows (CC3M style), repeated/treated as a one-frame video"""
    vq: Optional[str] = None
    """pre-extracted DALL-E token sidecar (VQ MVM target)"""
    targets: Optional[str] = None
    """pre-extracted MVM target sidecar folder(s) (`violet-ds extract-targets`), comma-separated, one per
    target; batches whose videos are all in a sidecar take that target from it, others run the live
    teacher. A sidecar describes the clip extraction read (evenly spaced segment-centre frames,
    short-side resize + centre crop, no flip), so the engine reads this source's training clips the
    same way (`sampling="fixed"`: no random frame offsets, crops, scale or flips) and refuses a source
    with another spatial mode (e.g. `vq`'s resize); the sidecar's num_frames / image size must equal
    data.num_frames / data.image_size, and two sidecars of one split may not hold the same target"""
    weight: float = 1.0
    """sampling weight when several sources are mixed"""


@dataclass
class DataConfig:
    """Where the frames and annotations are and how clips are sampled, batched and loaded."""

    train: List[DataSource] = field(default_factory=list)
    """training sources, each {tsv, annotations, ...} (`--data.train.help` lists the keys)"""
    val: List[DataSource] = field(default_factory=list)
    """validation sources (evaluated every `run.eval_every` steps or at each epoch end)"""
    test: List[DataSource] = field(default_factory=list)
    """test sources (`violet-ds evaluate --split test`)"""
    tokenizer: str = "data/demo/tokenizer"
    """local BERT-style tokenizer directory (vocab.txt / tokenizer.json)"""
    num_frames: int = 4
    """frames sampled per clip"""
    image_size: int = 224
    """side of the square crop every frame is resized/cropped to (pixels)"""
    max_text_len: int = 32
    """text tokens per sample, [CLS] and [SEP] included (longer texts are truncated)"""
    batch_size: int = 12
    """micro-batch size per process (per GPU); the global batch is batch_size x grad_accum x world size"""
    eval_batch_size: Optional[int] = None
    """micro-batch size per process at evaluation (None: batch_size)"""
    num_workers: int = 4
    """DataLoader worker processes per training process (0: load in the main process)"""
    pin_memory: bool = True
    """pin batches in page-locked memory for faster host-to-GPU copies (ignored on CPU)"""
    prefetch_factor: int = 2
    """batches each DataLoader worker prepares ahead"""
    jpeg_decoder: Literal["auto", "simplejpeg", "pillow"] = "auto"
    """JPEG decoder of the frames (auto: simplejpeg if it imports, else pillow)"""
    max_bad_fraction: float = 0.0
    """fraction of undecodable samples tolerated (skipped, counted, reported) before the run stops"""
    loader_timeout_s: float = 300.0
    """seconds the run waits for one batch before it stops its DataLoader workers and ends with an error (0 = wait forever)"""
    eval_clips: int = 1
    """clips per video at evaluation (multi-clip testing averages over them)"""
    frame_order: Literal["keep", "shuffle"] = "keep"
    """`shuffle`: an ablation that puts each clip's sampled frames in a random order other than their own (a fixed
    one per video at evaluation), to measure how much a model relies on the order of frames"""

    def sources(self, split: str) -> List[DataSource]:
        """The sources of `split` (train, val or test)."""
        splits = {"train": self.train, "val": self.val, "test": self.test}
        if split not in splits:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        return splits[split]


@dataclass
class TaskConfig:
    """What the model is trained for: the pretraining objectives or the downstream task and its heads."""

    name: str = "pretrain"
    """registered task (pretrain, vimpac_pretrain, qa_mc, qa_oe, retrieval, caption, action_cls, multitask)"""
    head_style: Literal["head", "mlm"] = "head"
    """task-specific heads (VIOLET/VIOLETv2) or answers at [MASK] through the MLM head (LAVENDER)"""
    task_token: bool = False
    """LAVENDER's task token (official `enable_task_token`, off in its released configs): head_style mlm
    tasks put a learned per-task vector (`heads.task_embedding`, official `emb_task`) between video and
    text: vtm (pretraining VTM, retrieval), mc, oe, cap. The table is always built (and loaded from
    LAVENDER checkpoints); off, it stays frozen and unused"""
    # --- pretraining objectives
    loss_weights: Dict[str, float] = field(default_factory=lambda: {"vtm": 1.0, "mlm": 1.0, "mvm": 1.0})
    """weight of each pretraining loss in the total (vtm, mlm, mvm); 0 turns that objective off"""
    vtm_negatives: int = 3
    """mismatched texts per video for video-text matching (taken from the same micro-batch)"""
    vtm_temperature: float = 0.05
    """softmax temperature of the video-text matching scores"""
    vtm_listwise: float = 0.0
    """head_style mlm: weight of `loss_vtm_listwise`, a softmax cross-entropy over each video's 1 +
    vtm_negatives true/false log-odds / vtm_temperature (own text first), added to LAVENDER's per-pair
    true/false loss (0 = LAVENDER's alone; it shortens the from-scratch plateau, see pretrain_demo_lavender.yaml)"""
    mlm_start_step: int = 0
    """pretraining: MLM joins the total loss at this optimizer step (before it, VTM and MVM train alone; the MLM
    loss is still computed and logged). On the demo data MLM delays LAVENDER-style VTM's take-off from its prior"""
    mlm_probability: float = 0.15
    """fraction of text tokens masked for masked language modeling"""
    mlm_replace: Literal["mask", "bert"] = "mask"
    """`mask`: every chosen token becomes [MASK] (official); `bert`: 80/10/10"""
    mvm_targets: Dict[str, float] = field(default_factory=lambda: {"pixel": 1.0})
    """MVM targets and their loss weights (pixel, hog, optical_flow, depth, vq, 2d_feature, 2d_clip_feature, 3d_feature)"""
    mvm_strategies: List[str] = field(default_factory=lambda: ["rm", "bm"])
    """visual masking strategies, one drawn per sample: rm (random), bm (blockwise), am (attended)"""
    mvm_ratio: float = 0.15
    """fraction of video tokens (patches) masked for masked visual modeling"""
    target_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """per-target options, e.g. {"2d_feature": {"weights": "swin_b.pth"}}"""
    # --- downstream
    num_answers: int = 0
    """answer vocabulary size for open-ended QA (0 = from the annotation file)"""
    num_options: int = 5
    """answer options per question for multiple-choice QA"""
    num_classes: int = 0
    """classes for action classification (0 = as many as task.options.labels lists)"""
    options: Dict[str, Any] = field(default_factory=dict)
    """task-specific options, validated by the task (unknown keys are errors)"""


@dataclass
class OptimConfig:
    """Optimizer (AdamW family) and learning-rate schedule; violet_ds builds both, not the ds_config."""

    optimizer: Literal["auto", "adamw", "deepspeed_fused_adam", "apex_fused_adam", "deepspeed_cpu_adam"] = "auto"
    """auto: fused torch AdamW (CUDA and CPU; DeepSpeedCPUAdam when the optimizer is offloaded)"""
    lr: float = 5e-5
    """peak learning rate (reached at the end of warm-up)"""
    betas: Tuple[float, float] = (0.9, 0.98)
    """Adam beta1, beta2"""
    eps: float = 1e-8
    """Adam epsilon"""
    weight_decay: float = 1e-3
    """decoupled (AdamW) weight decay"""
    no_decay_bias_norm: bool = True
    """no weight decay on biases and normalisation weights"""
    video_lr_mult: float = 1.0
    """learning-rate multiplier of the video encoder (VIOLETv2/LAVENDER backbone multiplier)"""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """learning-rate decay after warm-up"""
    warmup_ratio: float = 0.1
    """fraction of the optimizer steps spent in linear warm-up from 0"""
    warmup_steps: Optional[int] = None
    """overrides warmup_ratio when set"""
    min_lr_ratio: float = 0.0
    """final learning rate as a fraction of lr (linear and cosine schedules)"""
    grad_clip: float = 1.0
    """gradient-norm clipping threshold (DeepSpeed's gradient_clipping; in bf16 with torch's fused AdamW the fused
    kernel clips, see engine/deepspeed_engine.py; 0 = off)"""
    video_param_prefixes: List[str] = field(default_factory=lambda: ["model.video_backbone."])
    """parameter-name prefixes (in the task module) that get `video_lr_mult`"""


@dataclass
class EngineConfig:
    """DeepSpeed engine: ZeRO stage, precision, gradient accumulation, seeding and collectives."""

    ds_config: str = "zero2_bf16.json"
    """DeepSpeed JSON: a packaged config by name (cpu_test, zero2_bf16, zero2_fp16, zero2_offload; found inside
    the installed package) or a path to your own file; its "auto" fields are filled from this run config"""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto: what ds_config says"""
    zero_stage: Optional[int] = None
    """ZeRO stage; None: what ds_config says"""
    grad_accum: int = 1
    """micro-batches accumulated per optimizer step"""
    seed: int = 42
    """seed of weights, data order, masking and dropout (per-rank streams derive from it)"""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (warn only where no deterministic kernel exists)"""
    keep_host_memory: bool = True
    """CPU runs: glibc malloc keeps freed memory instead of returning large blocks to the kernel each step (the
    violet-v2 CPU step is 9-20% faster, peak RSS 8-10% higher); no effect on GPU runs or off glibc"""
    dist_timeout_s: int = 1800
    """timeout of every collective; a hung rank ends the job instead of blocking it forever"""
    ds_overrides: Dict[str, Any] = field(default_factory=dict)
    """keys merged (recursively) into the DeepSpeed JSON, e.g. {"zero_optimization": {"reduce_bucket_size": 5e7}}"""


@dataclass
class RunConfig:
    """The run directory and the loop around the steps: length, logging, validation, checkpoints, resume."""

    name: str = "run"
    """run name; everything is written to output_dir/name"""
    output_dir: str = "runs"
    """parent folder of the run directory"""
    epochs: int = 1
    """passes over the training data (unless max_steps is set)"""
    max_steps: Optional[int] = None
    """optimizer steps; overrides epochs when set"""
    log_every: int = 10
    """optimizer steps between logged metrics (TensorBoard, metrics.jsonl)"""
    eval_every: int = 0
    """optimizer steps between validations (0: at the end of each epoch)"""
    save_every: int = 0
    """optimizer steps between checkpoints (0: at the end of each epoch and of the run)"""
    keep_last: int = 3
    """checkpoints kept in checkpoints/ (older ones are deleted)"""
    image_every: int = 100
    """steps between TensorBoard images (masked input vs reconstruction); 0 = never"""
    resume: Optional[str] = None
    """auto (latest if any, else fresh), latest, or a checkpoint tag"""
    init_from: Optional[str] = None
    """module weights to start from: a run directory (its latest checkpoint), its checkpoints/ or a tag directory,
    a model directory (export --format dir), an exported .safetensors or an official checkpoint"""
    progress: bool = True
    """tqdm progress bars when stderr is a terminal; elsewhere (log files, SLURM) plain step lines
    (step, loss, lr, samples/s, ETA) are logged about every 5% of the run either way"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """level of log.txt and of the console log (DeepSpeed's logger follows, never below info)"""
    val_max_batches: Optional[int] = None
    """cap on validation batches per evaluation (None = the whole validation set)"""
    log_sample_indices: bool = False
    """record the dataset indices of every optimizer step in metrics.jsonl (resume audits)"""
    save_on_sigterm: bool = True
    """on SIGTERM (SLURM preemption) finish the current step, save a checkpoint and exit cleanly (with several
    ranks every rank stops together at the next logging window or checkpoint, at most run.log_every steps later)"""
    max_bad_steps: int = 3
    """consecutive optimizer steps with a non-finite loss (on any rank) after which the run counts as diverged
    (checked at each logging window and before each save; 0 disables the guard)"""
    on_divergence: Literal["stop", "rollback"] = "stop"
    """stop: end the run naming the last good checkpoint; rollback: reload it, skip the data window that
    diverged and continue (at most max_rollbacks times)"""
    max_rollbacks: int = 3
    """rollbacks allowed with on_divergence=rollback before the run stops as diverged"""
    overwrite: bool = False
    """start a fresh run (no resume) in a run directory that already holds checkpoints: deletes them"""
    allow_inexact_resume: bool = False
    """resume although the checkpoint's RNG files are missing or its model/data/batch settings differ from
    this run's (each difference is logged as a warning); the continuation is then not exact"""
    preflight: bool = True
    """before step 1 check that the run directory is writable, every configured split is present and
    non-empty, training TSV indexes are sound and init weights are readable"""


# ------------------------------------------------------------------------------------------ value checks
# Bounds of the numeric settings, checked before any heavy work (`check_values`): (lowest, highest), either
# None for no bound; a None value of an Optional setting is always allowed. Counts and sizes are >= 1.
BOUNDS: Dict[str, Tuple[Optional[float], Optional[float]]] = {
    "data.num_frames": (1, None), "data.image_size": (1, None),
    "data.max_text_len": (3, None),  # [CLS], at least one token, [SEP]
    "data.batch_size": (1, None), "data.eval_batch_size": (1, None), "data.num_workers": (0, None),
    "data.prefetch_factor": (1, None), "data.max_bad_fraction": (0, 1), "data.eval_clips": (1, None),
    "data.loader_timeout_s": (0, None),
    "optim.lr": (0, None), "optim.eps": (0, None), "optim.weight_decay": (0, None), "optim.video_lr_mult": (0, None),
    "optim.warmup_ratio": (0, 1), "optim.warmup_steps": (0, None), "optim.min_lr_ratio": (0, 1),
    "optim.grad_clip": (0, None),
    "engine.zero_stage": (0, 3), "engine.grad_accum": (1, None), "engine.dist_timeout_s": (1, None),
    "run.epochs": (1, None), "run.max_steps": (1, None), "run.log_every": (0, None), "run.eval_every": (0, None),
    "run.save_every": (0, None), "run.keep_last": (0, None), "run.image_every": (0, None),
    "run.val_max_batches": (1, None), "run.max_bad_steps": (0, None), "run.max_rollbacks": (0, None),
    "task.vtm_negatives": (0, None), "task.mlm_start_step": (0, None), "task.mlm_probability": (0, 1),
    "task.mvm_ratio": (0, 1), "task.num_answers": (0, None), "task.num_options": (1, None),
    "task.num_classes": (0, None),
}
# settings whose lowest value is excluded (a zero makes no sense either)
EXCLUSIVE_LOW = {"optim.eps"}


def type_problem(value: Any, hint: Any) -> Optional[str]:
    """Why `value` does not fit the annotation `hint` (None when it does, or when the hint is not checked).

    Integers fit float annotations; booleans fit only bool ones. Lists and tuples are checked item by item.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return None
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        problems = [type_problem(value, arg) for arg in args if arg is not type(None)]
        return None if any(problem is None for problem in problems) else problems[0]
    if origin is Literal:
        return None if value in args else f"expected one of {', '.join(map(repr, args))}, got {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if hint is str:
        return None if isinstance(value, (str, os.PathLike)) else f"expected a string, got {value!r}"
    if hint is dict or origin is dict:
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    sequences = (list, tuple, collections.abc.Sequence)
    if hint in sequences or origin in sequences:
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {value!r}"
        items = args if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis) else args[:1]
        if origin is tuple and items == args and len(args) != len(value):
            return f"expected {len(args)} items, got {value!r}"
        for number, item in enumerate(value):
            problem = type_problem(item, items[number] if len(items) > 1 else items[0]) if items else None
            if problem:
                return f"item {number}: {problem}"
        return None
    return None


# deprecated spellings of section keys that YAML files (a run's config.yaml) may hold: {section: {deprecated: name}}
DEPRECATED_KEYS: Dict[str, Dict[str, str]] = {"model": {"offload_video_activations": "offload_activations"}}


def deprecated_keys(config: Any) -> List[str]:
    """The dotted deprecated keys (`DEPRECATED_KEYS`) of a mapping of sections."""
    if not isinstance(config, Mapping):
        return []
    return [f"{section}.{key}" for section, names in DEPRECATED_KEYS.items()
            if isinstance(config.get(section), Mapping) for key in names if key in config[section]]


def upgrade_deprecated_keys(config: Any, source: str) -> Any:
    """`config` (a mapping of sections read from `source`) with every deprecated key under its name, each said
    once in a FutureWarning; both spellings with different values are a ValueError naming them."""
    found = deprecated_keys(config)
    if not found:
        return config
    config = {name: dict(value) if isinstance(value, Mapping) else value for name, value in config.items()}
    for dotted in found:
        section, key = dotted.split(".")
        name = DEPRECATED_KEYS[section][key]
        value = config[section].pop(key)
        if name in config[section] and config[section][name] != value:
            raise ValueError(f"{source}: {section}.{key} ({value!r}) and {section}.{name} "
                             f"({config[section][name]!r}) differ; keep {section}.{name} only")
        config[section][name] = value
        warnings.warn(f"{source}: {dotted} is deprecated; it is read as {section}.{name} (write that name)",
                      FutureWarning, stacklevel=2)
    return config


class ConfigValueError(ValueError):
    """A setting of the wrong type or out of its bounds: `key` names it (dotted), `problem` says what is wrong."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def check_field_types(instance: Any, where: str = "") -> None:
    """Every field of the dataclass `instance` holds a value of its annotated type, else a `ConfigValueError`
    naming `where.field` (configurations read from files: JSON and YAML carry any type)."""
    hints = typing.get_type_hints(type(instance))
    for item in dataclasses.fields(instance):
        problem = type_problem(getattr(instance, item.name), hints.get(item.name, Any))
        if problem:
            raise ConfigValueError(f"{where}.{item.name}" if where else item.name, problem)


def check_at_least(instance: Any, lowest: Mapping[str, float], where: str = "") -> None:
    """Numeric fields of the dataclass `instance` at or above their `lowest` value (a `ConfigValueError`
    naming the first that is not); a None field passes."""
    for name, low in lowest.items():
        value = getattr(instance, name)
        if value is not None and not isinstance(value, bool) and value < low:
            raise ConfigValueError(f"{where}.{name}" if where else name, f"must be >= {low:g}, got {value!r}")


def bound_problem(key: str, value: Any) -> Optional[str]:
    """Why `value` is out of the bounds of setting `key` (BOUNDS), or None."""
    if key not in BOUNDS or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = BOUNDS[key]
    if low is not None and (value < low or (value == low and key in EXCLUSIVE_LOW)):
        relation = "> " if key in EXCLUSIVE_LOW else ">= "
        wanted = "a positive number" if relation == "> " and low == 0 else f"{relation}{low:g}"
        if high is not None:
            wanted = f"between {low:g} and {high:g}"
        return f"must be {wanted}, got {value!r}"
    if high is not None and value > high:
        return f"must be between {low:g} and {high:g}, got {value!r}"
    return None


def check_values(**sections: Any) -> None:
    """The numeric settings of the given sections (`model=`, `data=`, `run=`, ... dataclasses) within their
    bounds (`BOUNDS`): a ValueError naming the first setting that is not, and what it must be. Light (no torch):
    the training commands call it before anything heavy is imported."""
    for section, config in sections.items():
        if config is None or not dataclasses.is_dataclass(config):
            continue
        for item in dataclasses.fields(config):
            key = f"{section}.{item.name}"
            problem = bound_problem(key, getattr(config, item.name))
            if problem:
                raise ConfigValueError(f"--{key}", problem)
