"""Official VIOLET / VIOLETv2 (EmpiricalMVM) / LAVENDER checkpoints <-> violet_ds task weights.

Official checkpoints are plain `state_dict()`s (no `module.` prefix, possibly fp16) of the upstream task
classes. violet_ds task modules hold `model` (the backbone, `violet.VioletModel`) and `heads` (a ModuleDict),
so their weights are keyed `model.*` and `heads.<name>.*`. The explicit map:

| official                                   | violet_ds                                        |
|--------------------------------------------|--------------------------------------------------|
| `enc_img.swin.*`                           | `model.video_backbone.*`                          |
| `enc_img.fc.*` (v2 / LAVENDER)             | `model.video_proj.*`                              |
| `enc_img.emb_cls / emb_pos / emb_len`      | `model.video_cls / video_spatial_pos / video_temporal_pos` |
| `enc_img.emb_odr` (v2 / LAVENDER)          | `model.video_order`                               |
| `enc_img.norm.*`                           | `model.video_norm.*`                              |
| `enc_txt.emb_txt.*`                        | `model.text_embeddings.*`                         |
| `trsfr.layer.N.*`                          | `model.cross_encoder.layer.N.*`                   |
| `fc.1.* / fc.3.*` (out 1)                  | `heads.score.1.* / heads.score.3.*`               |
| `fc.1.* / fc.3.*` (out = answer vocab)     | `heads.answer.1.* / heads.answer.3.*`             |
| `fc_mtm.predictions.transform.*`           | `heads.mlm.transform.*`                           |
| `fc_mtm.predictions.decoder.weight`        | `heads.mlm.decoder.weight`                        |
| `fc_mtm.predictions.bias` (= `decoder.bias`) | `heads.mlm.bias`                                |
| `fc_mvm.1.* / fc_mvm.3.*`                  | `heads.mvm.mlp.1.* / heads.mvm.mlp.3.*`           |
| `decoder_<target>.0.*` (pixel, hog, ...)   | `heads.mvm.proj.*`                                |
| `emb_task`                                 | `heads.task_embedding.weight`                     |

Dropped with a report: frozen teachers (`feature_model.`, `raft.`, `dpt.`, `dalle.`) and the legacy
`enc_txt.emb_txt.position_ids` buffer of transformers < 4.31. Anything else is reported as unmatched by
name (an error unless allowed).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from safetensors import safe_open
from torch import nn

from violet_ds.data.vq_clips import VQ_CODEBOOK_SIZE
from violet_ds.weights import (MODEL_DIR_WEIGHTS, Weights, check_finite, load_strict, read_state_dict,
                               save_safetensors)

from .heads import MLMHead, MVMHead, ScoreHead, TaskEmbedding, head_dropout

# `official_model` imports create_model from the package when called: models/__init__ imports this module

log = logging.getLogger(__name__)

TEACHER_PREFIXES = ("feature_model.", "raft.", "dpt.", "dalle.")
LEGACY_KEYS = ("enc_txt.emb_txt.position_ids",)

_DIRECT_PREFIXES = [
    ("enc_img.swin.", "model.video_backbone."),
    ("enc_img.fc.", "model.video_proj."),
    ("enc_img.norm.", "model.video_norm."),
    ("enc_txt.emb_txt.", "model.text_embeddings."),
    ("trsfr.layer.", "model.cross_encoder.layer."),
    ("fc_mtm.predictions.transform.", "heads.mlm.transform."),
    ("fc_mvm.", "heads.mvm.mlp."),
]
_DIRECT_KEYS = {
    "enc_img.emb_cls": "model.video_cls",
    "enc_img.emb_pos": "model.video_spatial_pos",
    "enc_img.emb_len": "model.video_temporal_pos",
    "enc_img.emb_odr": "model.video_order",
    "fc_mtm.predictions.decoder.weight": "heads.mlm.decoder.weight",
    "fc_mtm.predictions.bias": "heads.mlm.bias",
    "emb_task": "heads.task_embedding.weight",
}
_DENSE_DECODER = re.compile(r"^decoder_(?P<target>[a-z0-9_]+)\.0\.(?P<param>weight|bias)$")


# ------------------------------------------------------------------------------------------ reading

@dataclass
class OfficialWeights(Weights):
    """Weights of an official checkpoint, converted; `conversion` says what it holds and what was dropped."""

    conversion: Optional["ConversionReport"] = None


def read_weights_file(path: str | Path, allow_unmatched: bool = False) -> Weights:
    """violet_ds-keyed, finite weights of a weight file or a model directory, with their kind ("model_dir",
    "safetensors", "torch", or "official": an official VIOLET / VIOLETv2 / LAVENDER checkpoint converted to
    `model.*` / `heads.*`, teachers dropped). The file half of `engine.export.read_weights`, which adds
    DeepSpeed checkpoints; the models floor (`create_model(weights=...)`) reads through it."""
    path, kind = _weight_file(Path(path))
    state = read_state_dict(path)
    if is_official_state_dict(state):
        report = convert_official_state_dict(state, allow_unmatched=allow_unmatched)
        log.info("%s: official checkpoint: %s", path, report.summary())
        check_finite(report.state_dict, str(path))
        return OfficialWeights(report.state_dict, "official", path, conversion=report)
    check_finite(state, str(path))
    return Weights(state, kind, path)


def _weight_file(path: Path) -> tuple[Path, str]:
    """(the file to read, its kind) of a weight file or a model directory."""
    if not path.is_dir():
        return path, "safetensors" if path.suffix == ".safetensors" else "torch"
    if not (path / MODEL_DIR_WEIGHTS).is_file():
        raise FileNotFoundError(f"{path}: a folder without {MODEL_DIR_WEIGHTS}: not a model directory; a run or "
                                "checkpoint directory is read by `violet_ds.engine.export.read_weights` "
                                "(`model.weights`, `run.init_from`)")
    return path / MODEL_DIR_WEIGHTS, "model_dir"


def is_official_state_dict(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the official VIOLET-family key layout (`enc_img.*`, `trsfr.*`)."""
    return any(k.startswith(("enc_img.", "enc_txt.", "trsfr.")) for k in state)


def _upcast(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """fp16/bf16 checkpoints -> fp32 (integer buffers untouched)."""
    return {k: (v.float() if v.is_floating_point() and v.dtype != torch.float32 else v) for k, v in state.items()}


# ------------------------------------------------------------------------------------------ official -> ours

@dataclass
class ConversionReport:
    """What a conversion did: the converted state, the model/head description and every dropped key."""

    state_dict: Dict[str, torch.Tensor]
    model_name: str
    heads: Dict[str, dict] = field(default_factory=dict)
    teacher_keys: List[str] = field(default_factory=list)
    legacy_keys: List[str] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)

    def summary(self) -> str:
        teachers = sorted({k.split(".")[0] for k in self.teacher_keys})
        return (f"{len(self.state_dict)} tensors -> {self.model_name} + heads {sorted(self.heads)}; "
                f"dropped {len(self.teacher_keys)} teacher keys {teachers}, legacy {self.legacy_keys}; "
                f"unmatched {self.unmatched}")


def map_official_key(key: str, score_out: Optional[int] = None) -> Optional[str]:
    """The violet_ds name of one official key, or None if it has no counterpart."""
    if key in _DIRECT_KEYS:
        return _DIRECT_KEYS[key]
    for old, new in _DIRECT_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    if key.startswith("fc.") and key.split(".")[1] in ("1", "3"):
        head = "score" if score_out in (None, 1) else "answer"
        return f"heads.{head}." + key[len("fc."):]
    if _DENSE_DECODER.match(key):
        return "heads.mvm.proj." + _DENSE_DECODER.match(key).group("param")
    return None


def describe_official(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """Which backbone variant and which heads (with their sizes) an official state dict holds."""
    model_name = "violet-v2" if "enc_img.fc.weight" in state else "violet-v1"
    heads: Dict[str, dict] = {}
    if "fc.3.weight" in state:
        out = int(state["fc.3.weight"].shape[0])
        heads["score" if out == 1 else "answer"] = {"out": out}
    if "fc_mtm.predictions.bias" in state:
        heads["mlm"] = {"vocab_size": int(state["fc_mtm.predictions.bias"].shape[0]),
                        "tied": "fc_mtm.predictions.decoder.weight" not in state}
    if "fc_mvm.3.weight" in state:
        channels = int(state["fc_mvm.3.weight"].shape[0])
        # VQ ids are a classification over the DALL-E codebook; feature targets regress their width
        heads["mvm"] = {"kind": "token" if channels == VQ_CODEBOOK_SIZE else "feature", "channels": channels}
    dense = [m for m in map(_DENSE_DECODER.match, state) if m]
    if dense:
        target = dense[0].group("target")
        channels = int(state[f"decoder_{target}.0.weight"].shape[0]) // (32 * 32)
        heads["mvm"] = {"kind": "dense", "channels": channels, "target": target}
    if "emb_task" in state:
        heads["task_embedding"] = {"num_tasks": int(state["emb_task"].shape[0])}
    return {"model": model_name, "heads": heads,
            "max_frames": int(state["enc_img.emb_len"].shape[1]) if "enc_img.emb_len" in state else None}


def convert_official_state_dict(state: Dict[str, torch.Tensor], allow_unmatched: bool = False) -> ConversionReport:
    """Official keys -> `model.*` / `heads.*`, fp32. Raises KeyError on unmatched keys unless allowed."""
    state = _upcast(state)
    description = describe_official(state)
    score_out = description["heads"].get("score", description["heads"].get("answer", {})).get("out")
    out: Dict[str, torch.Tensor] = {}
    report = ConversionReport(state_dict=out, model_name=description["model"], heads=description["heads"])
    for key, value in state.items():
        if key.startswith(TEACHER_PREFIXES):
            report.teacher_keys.append(key)
            continue
        if key in LEGACY_KEYS:
            report.legacy_keys.append(key)
            continue
        if key == "fc_mtm.predictions.decoder.bias":
            # the same tensor as fc_mtm.predictions.bias in BERT's head; keep one copy, check they agree
            other = state.get("fc_mtm.predictions.bias")
            # meta tensors (shape-only checks) have no values to compare
            comparable = other is not None and "meta" not in (other.device.type, value.device.type)
            if comparable and not torch.equal(other.float(), value):
                raise ValueError("fc_mtm.predictions.bias and fc_mtm.predictions.decoder.bias differ; "
                                 "this checkpoint does not follow BERT's tied-bias layout")
            if other is None:
                out["heads.mlm.bias"] = value
            continue
        new_key = map_official_key(key, score_out)
        if new_key is None:
            report.unmatched.append(key)
            continue
        out[new_key] = value
    if report.unmatched and not allow_unmatched:
        raise KeyError(f"official keys with no violet_ds counterpart: {report.unmatched}")
    return report


# ------------------------------------------------------------------------------------------ ours -> official

def to_official_state_dict(state: Dict[str, torch.Tensor], mvm_target: str = "pixel",
                           legacy_position_ids: bool = True) -> Dict[str, torch.Tensor]:
    """violet_ds task weights (`model.*`, `heads.*`) -> official key layout (inverse of the map above).

    `mvm_target` names the official dense decoder (`decoder_<target>`); `legacy_position_ids` adds the
    `position_ids` buffer that the official code's transformers (< 4.31) expects in a strict load.
    """
    inverse_prefixes = [(new, old) for old, new in _DIRECT_PREFIXES]
    inverse_keys = {new: old for old, new in _DIRECT_KEYS.items()}
    state = dict(state)
    word_embeddings = state.get("model.text_embeddings.word_embeddings.weight")
    if "heads.mlm.bias" in state and "heads.mlm.decoder.weight" not in state:
        # a tied MLM head stores no decoder of its own; the official layout always has one, and a copy
        # of the word embeddings computes exactly what the tied head did
        if word_embeddings is None:
            raise KeyError("the MLM head is tied (no heads.mlm.decoder.weight) and the word embeddings "
                           "(model.text_embeddings.word_embeddings.weight) are missing")
        state["heads.mlm.decoder.weight"] = word_embeddings.clone()
        log.info("tied MLM head written with its own decoder weight (a copy of the word embeddings)")
    out: Dict[str, torch.Tensor] = {}
    unmatched = []
    for key, value in state.items():
        if key in inverse_keys:
            out[inverse_keys[key]] = value
            if key == "heads.mlm.bias":
                out["fc_mtm.predictions.decoder.bias"] = value.clone()
            continue
        for new, old in inverse_prefixes:
            if key.startswith(new):
                out[old + key[len(new):]] = value
                break
        else:
            if key.startswith(("heads.score.", "heads.answer.")):
                out["fc." + key.split(".", 2)[2]] = value
            elif key.startswith("heads.mvm.proj."):
                out[f"decoder_{mvm_target}.0." + key.rsplit(".", 1)[1]] = value
            else:
                unmatched.append(key)
    if unmatched:
        raise KeyError(f"violet_ds keys with no official counterpart: {unmatched}")
    if legacy_position_ids and "enc_txt.emb_txt.position_embeddings.weight" in out:
        positions = out["enc_txt.emb_txt.position_embeddings.weight"].shape[0]
        out["enc_txt.emb_txt.position_ids"] = torch.arange(positions).unsqueeze(0)
    return out


# ------------------------------------------------------------------------------------------ building / loading

def build_heads(heads: Dict[str, dict], model: nn.Module, tie_mlm: bool = False) -> nn.ModuleDict:
    """A heads ModuleDict matching a description from `describe_official` (or written by hand)."""
    hidden = model.hidden_size
    built = nn.ModuleDict()
    for name, spec in heads.items():
        if name in ("score", "answer"):
            built[name] = ScoreHead(hidden, out=spec["out"], dropout=head_dropout(model))
        elif name == "mlm":
            tie = model.word_embeddings if (tie_mlm or spec.get("tied")) else None
            built[name] = MLMHead(hidden, spec["vocab_size"], tie_to=tie)
        elif name == "mvm":
            built[name] = MVMHead(hidden, spec["kind"], spec["channels"], dropout=head_dropout(model))
        elif name == "task_embedding":
            built[name] = TaskEmbedding(spec["num_tasks"], hidden)
        else:
            raise KeyError(f"no head builder for {name!r}")
    return built


class OfficialModel(nn.Module):
    """Backbone + heads as a violet_ds task module lays them out (`model.*`, `heads.*`)."""

    def __init__(self, model: nn.Module, heads: nn.ModuleDict):
        super().__init__()
        self.model = model
        self.heads = heads


def load_official_checkpoint(path: str | Path, allow_unmatched: bool = False,
                             **model_overrides) -> tuple[OfficialModel, ConversionReport]:
    """Build the backbone and heads an official checkpoint describes and load it strictly."""
    weights = read_weights_file(path, allow_unmatched=allow_unmatched)
    if not isinstance(weights, OfficialWeights):
        raise ValueError(f"{path}: not an official VIOLET-family checkpoint (no `enc_img.*` / `trsfr.*` keys)")
    return official_model(weights, **model_overrides), weights.conversion


def official_model(weights: OfficialWeights, **model_overrides) -> OfficialModel:
    """The backbone and heads an official checkpoint (read by `read_weights_file`) describes, loaded strictly."""
    from . import create_model

    report = weights.conversion
    description_frames = report.state_dict.get("model.video_temporal_pos")
    overrides = dict(model_overrides)
    if description_frames is not None:
        overrides.setdefault("max_frames", int(description_frames.shape[1]))
    if "model.text_embeddings.word_embeddings.weight" in report.state_dict:
        overrides.setdefault("vocab_size", int(report.state_dict["model.text_embeddings.word_embeddings.weight"].shape[0]))
    model = create_model(report.model_name, **overrides)
    module = OfficialModel(model, build_heads(report.heads, model))
    load_strict(module, report.state_dict, source=str(weights.path))
    return module


# ------------------------------------------------------------------------------------------ conversion of whole files

def _save_safetensors(state: Dict[str, torch.Tensor], path: Path, metadata: Dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, metadata=metadata)


def _safetensors_metadata(path: Path) -> Dict[str, str]:
    if path.suffix != ".safetensors":
        return {}

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def convert_checkpoint(src: str, dst: str, direction: Literal["auto", "to_ours", "to_official"] = "auto",
                       mvm_target: Optional[str] = None, allow_unmatched: bool = False,
                       legacy_position_ids: bool = True, half: bool = False) -> str:
    """Convert an official VIOLET / VIOLETv2 / LAVENDER checkpoint to violet_ds safetensors, or back
    (`violet-ds convert-checkpoint` documents the arguments); returns the one-line summary
    `src -> dst: what was written`."""
    src_path, dst_path = Path(src), Path(dst)
    state = read_state_dict(src_path)
    if direction == "auto":
        ours = any(k.startswith(("model.", "heads.")) for k in state)
        direction = "to_official" if ours else "to_ours"
    if direction == "to_ours":
        report = convert_official_state_dict(state, allow_unmatched=allow_unmatched)
        metadata = {"format": "violet_ds", "model": report.model_name, "source": src_path.name,
                    "heads": ",".join(sorted(report.heads))}
        if "target" in report.heads.get("mvm", {}):
            metadata["mvm_target"] = report.heads["mvm"]["target"]
        _save_safetensors(report.state_dict, dst_path, metadata)
        return f"{src_path} -> {dst_path}: {report.summary()}"
    mvm_target = mvm_target or _safetensors_metadata(src_path).get("mvm_target", "pixel")
    official = to_official_state_dict(_upcast(state), mvm_target=mvm_target,
                                      legacy_position_ids=legacy_position_ids)
    if half:
        official = {k: (v.half() if v.is_floating_point() else v) for k, v in official.items()}
    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_path.with_suffix(dst_path.suffix + ".tmp")
    torch.save(official, tmp)
    tmp.replace(dst_path)
    return f"{src_path} -> {dst_path}: {len(official)} official tensors"


__all__ = [
    "read_weights_file", "official_model", "OfficialWeights", "is_official_state_dict", "map_official_key",
    "describe_official", "convert_official_state_dict",
    "to_official_state_dict", "build_heads", "load_official_checkpoint", "convert_checkpoint",
    "ConversionReport", "OfficialModel", "TEACHER_PREFIXES",
]
