"""Typed configuration of a training or evaluation run.

The training commands take one parameter per dataclass below, so a YAML file has the top-level keys
`model`, `data`, `task`, `optim`, `engine`, `run`, and every key and type is validated by jsonargparse
before any heavy work starts. Task-specific options that only one task understands live in
`task.options`; each task validates that dictionary itself and names any key it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple


@dataclass
class ModelConfig:
    """Which network to build and how to initialise it."""

    name: str = "violet-tiny"
    """registered model name (`violet-ds list-models`)"""
    weights: Optional[str] = None
    """initial weights: a violet_ds safetensors file, an official checkpoint (.pt) or a run's checkpoint dir"""
    pretrained_swin: Optional[str] = None
    """Video Swin Kinetics checkpoint or timm 2D Swin state dict to initialise the video encoder"""
    text_config_dir: Optional[str] = None
    """local Hugging Face BERT directory whose config (and weights) build the text/cross-modal part"""
    tie_mlm_head: bool = False
    """tie the MLM decoder to the word embeddings (BERT default); the official code does not"""
    grad_checkpointing: bool = False
    """checkpoint every video-encoder and cross-modal block (recompute in backward)"""
    offload_video_activations: bool = False
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
    eval_clips: int = 1
    """clips per video at evaluation (multi-clip testing averages over them)"""


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
    """gradient-norm clipping threshold (DeepSpeed gradient_clipping; 0 = off)"""
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
    """module weights to start from (pretraining checkpoint dir, export file or official checkpoint)"""
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
    """on SIGTERM (SLURM preemption) finish the current step, save a checkpoint and exit cleanly"""
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
