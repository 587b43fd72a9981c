"""Model directories: `save_pretrained` / `from_pretrained` and `violet-ds export --format dir`.

A model directory is self-contained (no paths back to the run or the data) and laid out as people
who use timm, open_clip or Hugging Face models expect:

```
config.json          what to rebuild: registered model name + its full configuration, the task
                     configuration (answer vocabularies and labels inlined), clip settings (frames, size, text length)
model.safetensors    the task weights (`model.*` backbone, `heads.*`), fp32 unless asked otherwise
vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json   the tokenizer
README.md            model card: what the model is, what it was trained on, the run's metrics
```

`from_pretrained(dir)` rebuilds the task module (backbone + heads) and loads the weights, read through the
weights entry (`violet_ds.engine.export.read_weights`), strictly (`violet_ds.weights.load_strict`); only
safetensors are read. `run.init_from`, `model.weights` and `violet-ds predict` accept such a directory.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, NamedTuple, Optional

import torch
from torch import nn

from violet_ds import __version__, paths
from violet_ds.config import (ConfigValueError, DataConfig, DataSource, ModelConfig, TaskConfig, check_field_types,
                              check_values)
from violet_ds.data.tokenizer import DEMO_MARKER, Tokenizer
from violet_ds.engine.export import locate_checkpoint, read_weights
from violet_ds.errors import UserError, message_of
from violet_ds.models import build_model, create_model
from violet_ds.tasks import create_task
from violet_ds.weights import MODEL_DIR_WEIGHTS, KeyReport, check_keys, load_strict, save_safetensors
if TYPE_CHECKING:
    from violet_ds.tasks.base import Task

CONFIG_FILE = "config.json"
WEIGHTS_FILE = MODEL_DIR_WEIGHTS
CARD_FILE = "README.md"
FORMAT = "violet_ds-model-dir"
FORMAT_VERSION = 1
# clip settings a model directory records (DataConfig fields), for inference on raw videos
CLIP_FIELDS = ("num_frames", "image_size", "max_text_len")
# VioletConfig fields that name files of the machine that built the model; the weights replace them
_PATH_FIELDS = ("text_config_dir", "pretrained_swin")


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a model directory written by `save_pretrained` (config.json + model.safetensors)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


# ------------------------------------------------------------------------------------------ config
def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def model_config(model: nn.Module) -> Dict[str, Any]:
    """The model's full configuration as `create_model` overrides (BERT sizes resolved, no file paths).

    A model built from a Hugging Face BERT directory (`text_config_dir`) takes its sizes from that
    directory's config: they are written out here, so the directory is not needed to rebuild it.
    """
    cfg = getattr(model, "cfg", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        raise TypeError(f"{type(model).__name__} has no dataclass `cfg`; save_pretrained needs one to rebuild it")
    config = dataclasses.asdict(cfg)
    bert = getattr(model, "bert_config", None)
    if bert is not None:
        config.update(hidden_size=bert.hidden_size, num_layers=bert.num_hidden_layers,
                      num_heads=bert.num_attention_heads, intermediate_size=bert.intermediate_size,
                      vocab_size=bert.vocab_size, max_position_embeddings=bert.max_position_embeddings,
                      type_vocab_size=bert.type_vocab_size, hidden_dropout=bert.hidden_dropout_prob,
                      attention_dropout=bert.attention_probs_dropout_prob, layer_norm_eps=bert.layer_norm_eps,
                      initializer_range=bert.initializer_range, pad_token_id=bert.pad_token_id)
    for key in _PATH_FIELDS:
        if key in config:
            config[key] = None
    return _jsonable(config)


def _restore_tuples(config: Dict[str, Any]) -> Dict[str, Any]:
    """JSON lists -> tuples in the nested Swin overrides (the Swin config compares and hashes them)."""
    out = dict(config)
    if isinstance(out.get("swin_overrides"), dict):
        out["swin_overrides"] = {k: tuple(v) if isinstance(v, list) else v for k, v in out["swin_overrides"].items()}
    return out


def task_config(task: Task) -> Dict[str, Any]:
    """The task's TaskConfig as JSON, with file-backed answer vocabularies and labels inlined
    (`Task.portable_options`: a model directory names no file of the machine that wrote it)."""
    if not dataclasses.is_dataclass(task.cfg):
        raise TypeError(f"{type(task).__name__} has no dataclass `cfg` (a TaskConfig)")
    config = dataclasses.asdict(task.cfg)
    config["options"] = task.portable_options()
    return _jsonable(config)


class UnknownKeysError(UserError, ValueError):
    """A configuration read from a file holds keys its dataclass does not have; the message names them."""


def _known_fields(cls, values: Mapping[str, Any], where: str, newer: bool = False) -> Dict[str, Any]:
    """The fields of dataclass `cls` in `values`. Other keys are an `UnknownKeysError` naming them at `where`
    (`file: section`), or, when `newer` (the file was written by a newer violet_ds), left out with one warning."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in values if k not in names)
    if unknown and not newer:
        raise UnknownKeysError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    if unknown:
        warnings.warn(f"{where}: keys {unknown} were written by a newer violet_ds and are left out", stacklevel=3)
    return {k: v for k, v in values.items() if k in names}


def _written_by_newer(config: Mapping[str, Any]) -> bool:
    """Whether a model directory's config.json names a violet_ds version newer than this one."""
    return _version_key(str(config.get("violet_ds_version", ""))) > _version_key(_version())


def _version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("+")[0].split("."))


# ------------------------------------------------------------------------------------------ saving
def save_pretrained(task: Task, directory: str | Path, *, model_name: Optional[str] = None,
                    tokenizer=None, clip: Optional[Mapping[str, Any]] = None, dtype: str = "fp32",
                    card: Optional[Mapping[str, Any]] = None, state_dict: Optional[Dict[str, torch.Tensor]] = None
                    ) -> Path:
    """Write a task module (backbone `task.model` + `task.heads`) as a model directory.

    Args:
        task: a violet_ds task module (what `create_task` returns), weights as they are now.
        directory: output folder (created; files in it are replaced).
        model_name: registered model name (default: the name `create_model` recorded on the model).
        tokenizer: the task's tokenizer (default `task.tokenizer`); its files are copied.
        clip: num_frames / image_size / max_text_len the model was trained with (for inference).
        dtype: fp32, bf16 or fp16 for the floating-point tensors.
        card: extra facts for the model card (`trained_on`, `metrics`, `source`, `steps`, ...).
        state_dict: weights to write instead of `task.state_dict()` (e.g. consolidated fp32 masters).
    """
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    model = task.model
    model_name = model_name or model.registered_name
    if not model_name:
        raise ValueError("save_pretrained: give model_name (the model was not built by create_model)")
    tokenizer = tokenizer if tokenizer is not None else task.tokenizer
    if tokenizer is None:
        raise ValueError("save_pretrained: give the tokenizer (the task holds none)")
    own = task.state_dict()
    state = dict(state_dict) if state_dict is not None else own
    # the same check a load will make: a directory that cannot be loaded back is never written
    check_keys(state, own, "save_pretrained: weights do not match the task")
    tensors = {k: (v.detach().to("cpu", dtypes[dtype]) if v.is_floating_point() else v.detach().cpu()).contiguous()
               for k, v in state.items()}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    clip_settings = {k: int(v) for k, v in dict(clip or {}).items() if k in CLIP_FIELDS and v is not None}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "violet_ds_version": _version(),
        "model": {"name": model_name, "config": model_config(model), "tie_mlm_head": task.tie_mlm_head},
        "task": task_config(task),
        "clip": clip_settings,
        "heads": sorted(task.heads.keys()),
        "dtype": dtype,
        "demo_vocabulary": bool(getattr(tokenizer, "is_demo", False)),
    }
    save_safetensors(tensors, out / WEIGHTS_FILE,
                     metadata={"format": "violet_ds", "model_name": model_name, "dtype": dtype})
    tokenizer.hf.save_pretrained(str(out))
    source_dir = Path(getattr(tokenizer, "path", ""))
    for name in ("vocab.txt", "special_tokens_map.json", DEMO_MARKER):
        # the plain WordPiece vocabulary too, for readers that do not parse tokenizer.json
        if not (out / name).is_file() and (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out / name)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (out / CARD_FILE).write_text(model_card(config, tensors, dict(card or {})))
    return out


def _version() -> str:
    return str(__version__)


def model_card(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> str:
    """The README.md of a model directory (facts only: nothing here is guessed)."""
    task = config["task"]
    params = sum(int(t.numel()) for k, t in tensors.items() if t.is_floating_point())
    lines = [f"# {card.get('title') or config['model']['name'] + ' / ' + task['name']}", "",
             "A violet_ds model directory (config.json, model.safetensors, tokenizer files).", "",
             "| | |", "|---|---|",
             f"| model | `{config['model']['name']}` ({params / 1e6:.2f}M values in {len(tensors)} tensors, "
             f"{config['dtype']}) |",
             f"| task | `{task['name']}`, head style `{task['head_style']}` |",
             f"| heads | {', '.join(config['heads']) or '-'} |",
             f"| clip | {', '.join(f'{k} {v}' for k, v in config['clip'].items()) or 'not recorded'} |"]
    for key in ("source", "training_samples", "steps", "epochs", "wall_s"):
        if card.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {card[key]} |")
    lines += ["", "## Trained on", ""]
    trained_on = card.get("trained_on") or []
    lines += [f"- {item}" for item in trained_on] or ["- not recorded (saved from Python without a run)"]
    metrics = card.get("metrics") or {}
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        for name, value in metrics.items():
            lines.append(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")
    else:
        lines.append("No metrics recorded for this model.")
    lines += ["", "## Intended use and limitations", ""]
    if config.get("demo_vocabulary"):
        lines += ["A demo model: trained on the synthetic demo data of `violet-ds make-demo-data` (coloured shapes",
                  "moving on plain backgrounds) with that data's vocabulary of a few hundred word pieces at most. It",
                  "exists to show that the pipeline trains, exports and predicts; on real videos its answers mean",
                  "nothing (`violet-ds predict` says so)."]
    else:
        lines += ["For research on video-language understanding: the task above on videos like those it was trained",
                  "on, and as a starting point for finetuning (`--run.init_from`). It has not been evaluated for",
                  "uses beyond the metrics below, and it inherits the biases and gaps of its training data."]
    lines += ["", "## License", "",
              "The violet_ds code is MIT-licensed. These weights were trained on the data listed above: their use",
              "is bound by that data's terms, and by the license of any checkpoint they were initialised from."]
    lines += ["", "## Use", "", "```python", "import violet_ds", "",
              "task = violet_ds.from_pretrained(\"PATH\")  # backbone task.model + heads task.heads, eval mode",
              "```", "", "```bash",
              "violet-ds predict --model PATH --videos clip.mp4 --question \"what is shown?\"",
              "violet-ds finetune --config CONFIG.yaml --run.init_from PATH", "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ loading
class ModelDirError(UserError):
    """A model directory that cannot be loaded; the message names the file, the key and what to do."""


# the sections of config.json and the JSON type each must have
_SECTIONS = {"model": dict, "task": dict, "clip": dict, "heads": list}
_REEXPORT = "re-export the model (`violet-ds export --format dir`) or fix the value"


def read_config(directory: str | Path) -> Dict[str, Any]:
    """A model directory's config.json, its sections and clip settings checked (`ModelDirError` naming the key)."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelDirError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                            f"{_REEXPORT}") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{path}: not a text file; {_REEXPORT}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path}: expected a JSON object, got {type(config).__name__}; {_REEXPORT}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: not a violet_ds model directory config (format {config.get('format')!r})")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelDirError(f"{path}: format_version: expected an integer, got {version!r}; {_REEXPORT}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {config['format_version']} is newer than this violet_ds "
                         f"reads ({FORMAT_VERSION}); upgrade violet_ds")
    for key, kind in _SECTIONS.items():
        if key in ("model", "task") and key not in config:
            raise ModelDirError(f"{path}: no `{key}` section; {_REEXPORT}")
        if key in config and not isinstance(config[key], kind):
            raise ModelDirError(f"{path}: {key}: expected a JSON {'object' if kind is dict else 'list'}, got "
                                f"{config[key]!r}; {_REEXPORT}")
    model = config["model"]
    for key, kind, what in (("name", str, "a string"), ("config", dict, "a JSON object")):
        if not isinstance(model.get(key), kind):
            raise ModelDirError(f"{path}: model.{key}: expected {what}, got {model.get(key)!r}; {_REEXPORT}")
    if not isinstance(config["task"].get("name"), str):
        raise ModelDirError(f"{path}: task.name: expected a string, got {config['task'].get('name')!r}; {_REEXPORT}")
    for key, value in (config.get("clip") or {}).items():
        lowest = 3 if key == "max_text_len" else 1  # [CLS] x [SEP]
        if key in CLIP_FIELDS and (not isinstance(value, int) or isinstance(value, bool) or value < lowest):
            raise ModelDirError(f"{path}: clip.{key} must be an integer >= {lowest}, got {value!r}; {_REEXPORT}")
    return config


def _build_config(task_cfg, mvm: bool):
    """The TaskConfig to build: without `mvm`, a pretraining task leaves out its MVM objective (no
    teachers, no MVM heads; inference never needs them) unless MVM is all it trains."""
    weights = dict(task_cfg.loss_weights or {})
    if mvm or task_cfg.name != "pretrain" or not float(weights.get("mvm", 0.0)):
        return task_cfg
    if not any(float(w) for name, w in weights.items() if name != "mvm"):
        return task_cfg
    return dataclasses.replace(task_cfg, loss_weights={**weights, "mvm": 0.0})


def _load(task: nn.Module, state: Dict[str, torch.Tensor], source: str, mvm: bool) -> KeyReport:
    """Strict load; without `mvm` the file's MVM head weights are left out (the task was built without them)."""
    own = task.state_dict()
    state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
    # the file's MVM head weights of a task built without them
    skipped = () if mvm else tuple(k for k in state if k.startswith("heads.mvm") and k not in own)
    return load_strict(task, state, source=source, ignore=skipped)


def from_pretrained(directory: str | Path, device: str | torch.device = "cpu", mvm: bool = True) -> nn.Module:
    """Rebuild the task module saved by `save_pretrained` and load its weights strictly; eval mode.

    The returned module holds `.model` (backbone), `.heads`, `.tokenizer`, `.cfg` (TaskConfig) and
    `.clip` (the recorded clip settings). `mvm=False` builds a pretraining task without its MVM
    objective (no teacher is built or read; the MVM heads' weights are skipped), for inference.
    """
    directory = Path(directory)
    if not is_model_dir(directory):
        raise FileNotFoundError(f"{directory}: not a model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = read_config(directory)
    path = directory / CONFIG_FILE
    tokenizer = Tokenizer(directory)
    name = config["model"]["name"]
    try:
        model = create_model(name, **_restore_tuples(config["model"]["config"]))
    except ConfigValueError as error:
        raise ModelDirError(f"{path}: model.config.{error.key}: {error.problem}; {_REEXPORT}") from error
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        # an unknown model name, an unknown or unusable key: the builder's message names it
        fix = (f"it was written by violet_ds {config.get('violet_ds_version')}: upgrade violet_ds (this is "
               f"{_version()})") if _written_by_newer(config) else _REEXPORT
        raise ModelDirError(f"{path}: model {name!r} cannot be built from model.name / model.config "
                            f"({message_of(error)}); {fix}") from error
    try:
        task_cfg = TaskConfig(**_known_fields(TaskConfig, config["task"], f"{path}: task", _written_by_newer(config)))
        check_field_types(task_cfg, "task")
        check_values(task=task_cfg)
    except ConfigValueError as error:
        raise ModelDirError(f"{path}: {error.key.lstrip('-')}: {error.problem}; {_REEXPORT}") from error
    task_cfg = _build_config(task_cfg, mvm)
    try:
        task = create_task(task_cfg.name, model, task_cfg, tokenizer, clip=config.get("clip"),
                           tie_mlm_head=bool(config["model"].get("tie_mlm_head", False)))
    except (TypeError, ValueError, KeyError) as error:
        raise ModelDirError(f"{path}: task {task_cfg.name!r} cannot be built from its `task` section "
                            f"({message_of(error)}); {_REEXPORT}") from error
    weights = read_weights(directory)
    _load(task, weights.state, str(weights.path), mvm)
    return task.to(device).eval()


# ------------------------------------------------------------------------------------------ runs
def read_run_config(run_dir: str | Path):
    """(ModelConfig, DataConfig, TaskConfig) from a run directory's resolved `config.yaml`, its paths as they
    are now (`violet_ds.paths.read_run_config`: absolute, re-rooted if the run directory moved with its data)."""
    raw = paths.read_run_config(run_dir)
    where = f"{Path(run_dir) / paths.CONFIG_FILE}:"
    model = ModelConfig(**_known_fields(ModelConfig, raw.get("model") or {}, f"{where} model"))
    data_raw = dict(raw.get("data") or {})
    for split in ("train", "val", "test"):
        data_raw[split] = [DataSource(**_known_fields(DataSource, s, f"{where} data.{split}"))
                           for s in data_raw.get(split) or []]
    data = DataConfig(**_known_fields(DataConfig, data_raw, f"{where} data"))
    task = TaskConfig(**_known_fields(TaskConfig, raw.get("task") or {}, f"{where} task"))
    return model, data, task


class LoadedRun(NamedTuple):
    """What `load_run` rebuilds: the task with the checkpoint's weights, the run's configs, its tokenizer and
    the tag directory the weights came from."""

    task: nn.Module
    model_cfg: Any
    data_cfg: Any
    tokenizer: Any
    checkpoint: Path


def load_run(run_dir: str | Path, tag: Optional[str] = None, mvm: bool = True,
             tokenizer: Optional[str] = None) -> LoadedRun:
    """The run's task with the checkpoint's consolidated fp32 weights, its configs and tokenizer (`LoadedRun`).

    The task is rebuilt from the run's config.yaml exactly as training built it; the weights are
    loaded strictly (a key the task lacks, or lacks in the file, is an error naming it). `mvm=False`
    as in `from_pretrained`; `tokenizer` replaces the run's tokenizer directory.
    """
    checkpoint_dir, tag = locate_checkpoint(run_dir, tag)
    run_dir = checkpoint_dir.parent
    model_cfg, data_cfg, task_cfg = read_run_config(run_dir)
    # the weights come from the checkpoint: do not read the initial ones again
    model_cfg = dataclasses.replace(model_cfg, weights=None, pretrained_swin=None)
    if tokenizer is not None:
        data_cfg = dataclasses.replace(data_cfg, tokenizer=str(Path(tokenizer).resolve()))
    tokenizer = _run_tokenizer(data_cfg.tokenizer, run_dir)
    task_cfg = _build_config(task_cfg, mvm)
    task = create_task(task_cfg.name, build_model(model_cfg), task_cfg, tokenizer,
                       tie_mlm_head=model_cfg.tie_mlm_head)
    weights = read_weights(checkpoint_dir / tag)
    _load(task, weights.state, str(weights.path), mvm)
    return LoadedRun(task, model_cfg, data_cfg, tokenizer, weights.path)


def _run_tokenizer(directory: str, run_dir: Path):
    """The run's tokenizer, or one line saying how to name another one."""
    try:
        return Tokenizer(directory)
    except (FileNotFoundError, ValueError, OSError) as error:
        raise FileNotFoundError(f"{run_dir}: the run's tokenizer cannot be read ({error}); pass "
                                "--tokenizer DIR") from None


def _run_card(run_dir: Path, data_cfg, source: str) -> Dict[str, Any]:
    """Model-card facts of a run: training sources, steps, last validation metrics."""
    card: Dict[str, Any] = {"source": source}
    card["trained_on"] = [f"`{Path(s.annotations).name}` (split {s.split}, {s.kind}) with frames "
                          f"`{', '.join(Path(part).name for part in s.tsv.split(','))}`"
                          + (f", weight {s.weight}" if s.weight != 1.0 else "") for s in data_cfg.train]
    metrics: Dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        card.update(steps=summary.get("steps"), epochs=summary.get("epochs"), wall_s=summary.get("wall_s"),
                    training_samples=summary.get("train_samples"))
        if summary.get("last_loss") is not None:
            metrics["train loss (last logged)"] = float(summary["last_loss"])
        for key, value in sorted((summary.get("val") or {}).items()):
            if isinstance(value, (int, float)):
                metrics[f"val {key}"] = float(value)
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file() and not any(k.startswith("val ") for k in metrics):
        last_val = None
        for line in metrics_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record.get("split") == "val":
                    last_val = record
        if last_val:
            for key, value in sorted(last_val.items()):
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    metrics[f"val {key} (step {last_val.get('step')})"] = float(value)
    for path in sorted(run_dir.glob("eval_*.json")):
        for key, value in sorted(json.loads(path.read_text()).items()):
            if isinstance(value, (int, float)):
                metrics[f"{path.stem[len('eval_'):]} {key}"] = float(value)
    card["metrics"] = metrics
    return card


def export_dir(checkpoint: str, output: Optional[str] = None, tag: Optional[str] = None,
               dtype: str = "fp32", tokenizer: Optional[str] = None) -> Path:
    """A run's checkpoint -> model directory (the body of `violet-ds export --format dir`)."""
    checkpoint_dir, tag = locate_checkpoint(checkpoint, tag)
    run_dir = checkpoint_dir.parent
    task, model_cfg, data_cfg, tokenizer, _ = load_run(run_dir, tag, tokenizer=tokenizer)
    out = Path(output) if output else run_dir / "export" / tag
    clip = {k: getattr(data_cfg, k) for k in CLIP_FIELDS}
    # the source as the run knows it (run directory name, tag), never an absolute path of the machine
    card = _run_card(run_dir, data_cfg, f"run `{run_dir.name}`, checkpoint `{tag}`")
    card["title"] = f"{model_cfg.name} / {task.cfg.name} ({run_dir.name}, {tag})"
    save_pretrained(task, out, model_name=model_cfg.name, tokenizer=tokenizer, clip=clip, dtype=dtype, card=card)
    print(f"exported {checkpoint_dir / tag} -> {out}/ ({CONFIG_FILE}, {WEIGHTS_FILE}, tokenizer, {CARD_FILE})",
          flush=True)
    return out


__all__ = ["save_pretrained", "from_pretrained", "is_model_dir", "export_dir", "load_run", "LoadedRun",
           "read_run_config", "UnknownKeysError",
           "model_config", "task_config", "model_card", "CONFIG_FILE", "WEIGHTS_FILE"]

