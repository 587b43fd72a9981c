"""Loaders for every official annotation JSON format, validated with errors naming file and record.

Formats (docs/reference.md#4-data-formats):
- pretraining captions `txt_{cc3m,webvid2.5m}.json`: `{"train": {id: [caption, ...]}, "val": {...}}`;
- retrieval / captioning: `{"train"|"val"|"test": [{"video", "caption"}]}` (caption: str or list);
- multiple-choice QA: `[{"question", "option_0".."option_{K-1}", "answer": int, "video"}]` per split
  (TGIF style); MSRVTT-MC style has no question (or an empty one) and one caption per option;
  an `"options": [...]` list is accepted as well;
- open-ended QA: `[{"video", "question", "answer": int}]` per split plus a top-level `"vocab"` list;
  LAVENDER's optional `"answer_text"` is kept; an answer outside the vocabulary (or -1 / null) marks
  an unanswerable item, counted wrong at evaluation;
- fill-in-the-blank (LSMDC-FiB): the open-ended format where the question holds a blank (`_____`);
- action classification (this project's format, official ones are lists of (video, label)):
  `{"train": [{"video", "label": int}], ..., "labels": [name, ...]}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union

PathLike = Union[str, Path]
UNANSWERABLE = -1
BLANK_PATTERN = re.compile(r"_{2,}")


class AnnotationError(ValueError):
    """Malformed annotation file; the message names the file, split and record."""


@dataclass
class CaptionRecord:
    video: str
    captions: list[str]


@dataclass
class TextVideoRecord:
    video: str
    caption: str


@dataclass
class MCRecord:
    video: str
    question: str
    options: list[str]
    answer: int


@dataclass
class OERecord:
    video: str
    question: str
    answer: int
    answer_text: Optional[str] = None


@dataclass
class ActionRecord:
    video: str
    label: int


@dataclass
class OEAnnotations:
    records: list[OERecord]
    vocab: list[str]
    unanswerable: int = 0


@dataclass
class ActionAnnotations:
    records: list[ActionRecord]
    labels: list[str] = field(default_factory=list)


def read_json(path: PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise AnnotationError(f"{path}: invalid JSON ({err})") from err


def _split(data: Any, path: PathLike, split: str) -> Any:
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with splits, got {type(data).__name__}")
    if split not in data:
        splits = [k for k in data if k not in ("vocab", "labels")]
        raise AnnotationError(f"{path}: no split {split!r} (has {', '.join(map(repr, splits))})")
    return data[split]


def _where(path: PathLike, split: str, index: Union[int, str]) -> str:
    return f"{path}: {split}[{index!r}]" if isinstance(index, str) else f"{path}: {split}[{index}]"


def _require(record: Any, keys: tuple, where: str) -> None:
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: expected an object, got {type(record).__name__}")
    for key in keys:
        if key not in record:
            raise AnnotationError(f"{where}: missing key {key!r} (has {', '.join(map(repr, record))})")


def _text(value: Any, where: str, key: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise AnnotationError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise AnnotationError(f"{where}: {key!r} is empty")
    return value


def _int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnnotationError(f"{where}: {key!r} must be an integer, got {value!r}")
    return value


def _video(record: dict, where: str) -> str:
    video = record["video"]
    if isinstance(video, int) and not isinstance(video, bool):
        video = str(video)
    return _text(video, where, "video")


def _captions(value: Any, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not captions:
        raise AnnotationError(f"{where}: caption must be a string or a non-empty list of strings")
    return [_text(c, where, "caption") for c in captions]


# ---------------------------------------------------------------- loaders

def load_pretrain_captions(path: PathLike, split: str = "train") -> list[CaptionRecord]:
    """`{"train": {video_id: [caption, ...]}}` -> records in file order."""
    entries = _split(read_json(path), path, split)
    if not isinstance(entries, dict):
        raise AnnotationError(f"{path}: split {split!r} must map video ids to caption lists")
    return [CaptionRecord(str(video), _captions(captions, _where(path, split, str(video))))
            for video, captions in entries.items()]


def load_text_video(path: PathLike, split: str = "train") -> list[TextVideoRecord]:
    """Retrieval / captioning rows `{"video", "caption"}`; a caption list becomes one record per caption."""
    entries = _split(read_json(path), path, split)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: split {split!r} must be a list of {{video, caption}} records")
    records = []
    for index, record in enumerate(entries):
        where = _where(path, split, index)
        _require(record, ("video", "caption"), where)
        video = _video(record, where)
        records.extend(TextVideoRecord(video, caption) for caption in _captions(record["caption"], where))
    return records


load_retrieval = load_text_video
load_captioning = load_text_video


def load_mc_qa(path: PathLike, split: str = "train", num_options: Optional[int] = None) -> list[MCRecord]:
    """Multiple-choice QA (TGIF / MSRVTT-MC / LSMDC-MC): options from `option_i` keys or an `options` list."""
    entries = _split(read_json(path), path, split)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: split {split!r} must be a list of records")
    records = []
    for index, record in enumerate(entries):
        where = _where(path, split, index)
        _require(record, ("video", "answer"), where)
        if "options" in record:
            options = record["options"]
            if not isinstance(options, list):
                raise AnnotationError(f"{where}: 'options' must be a list")
        else:
            options, number = [], 0
            while f"option_{number}" in record:
                options.append(record[f"option_{number}"])
                number += 1
        if len(options) < 2:
            raise AnnotationError(f"{where}: needs at least 2 options (option_0, option_1, ...)")
        if num_options is not None and len(options) != num_options:
            raise AnnotationError(f"{where}: has {len(options)} options, expected {num_options}")
        options = [_text(o, where, f"option_{i}", allow_empty=True) for i, o in enumerate(options)]
        question = _text(record.get("question", "") or "", where, "question", allow_empty=True)
        answer = _int(record["answer"], where, "answer")
        if not 0 <= answer < len(options):
            raise AnnotationError(f"{where}: answer {answer} is not an option index (0..{len(options) - 1})")
        records.append(MCRecord(_video(record, where), question, options, answer))
    return records


def load_oe_qa(path: PathLike, split: str = "train", vocab_size: Optional[int] = None) -> OEAnnotations:
    """Open-ended QA with a top-level answer `vocab`; answers outside it become -1 (unanswerable)."""
    data = read_json(path)
    entries = _split(data, path, split)
    vocab = data.get("vocab")
    if not isinstance(vocab, list) or not vocab or not all(isinstance(v, str) for v in vocab):
        raise AnnotationError(f"{path}: top-level 'vocab' must be a non-empty list of answer strings")
    if vocab_size is not None and vocab_size > 0:
        vocab = vocab[:vocab_size]
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: split {split!r} must be a list of records")
    records, unanswerable = [], 0
    for index, record in enumerate(entries):
        where = _where(path, split, index)
        _require(record, ("video", "question", "answer"), where)
        answer = record["answer"]
        if answer is None:
            answer = UNANSWERABLE
        answer = _int(answer, where, "answer")
        if answer < -1:
            raise AnnotationError(f"{where}: answer {answer} is negative (use -1 for unanswerable)")
        if answer >= len(vocab):
            answer = UNANSWERABLE
        unanswerable += answer == UNANSWERABLE
        answer_text = record.get("answer_text")
        if answer_text is not None:
            answer_text = _text(answer_text, where, "answer_text")
        records.append(OERecord(_video(record, where), _text(record["question"], where, "question"),
                                answer, answer_text))
    return OEAnnotations(records, vocab, unanswerable)


def load_fib(path: PathLike, split: str = "train", vocab_size: Optional[int] = None) -> OEAnnotations:
    """Fill-in-the-blank: open-ended format whose question holds exactly one blank (`__`+)."""
    annotations = load_oe_qa(path, split, vocab_size)
    for index, record in enumerate(annotations.records):
        if len(BLANK_PATTERN.findall(record.question)) != 1:
            raise AnnotationError(f"{_where(path, split, index)}: question must contain exactly one blank "
                                  f"('_____'): {record.question!r}")
    return annotations


def load_action(path: PathLike, split: str = "train") -> ActionAnnotations:
    """Action classification `{split: [{"video", "label": int}], "labels": [...]}`."""
    data = read_json(path)
    entries = _split(data, path, split)
    labels = data.get("labels", [])
    if not isinstance(labels, list):
        raise AnnotationError(f"{path}: 'labels' must be a list of class names")
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: split {split!r} must be a list of records")
    records = []
    for index, record in enumerate(entries):
        where = _where(path, split, index)
        _require(record, ("video", "label"), where)
        label = _int(record["label"], where, "label")
        if label < 0 or (labels and label >= len(labels)):
            raise AnnotationError(f"{where}: label {label} outside 0..{len(labels) - 1 if labels else 'inf'}")
        records.append(ActionRecord(_video(record, where), label))
    return ActionAnnotations(records, labels)


def detect_format(path: PathLike) -> str:
    """Guess an annotation file's format: pretrain, text_video, mc_qa, oe_qa, fib or action."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected a JSON object with splits")
    if "labels" in data:
        return "action"
    split = next((k for k in data if k not in ("vocab", "labels")), None)
    if split is None:
        raise AnnotationError(f"{path}: no split found")
    entries = data[split]
    if isinstance(entries, dict):
        return "pretrain"
    first = entries[0] if entries else {}
    if "vocab" in data:
        return "fib" if BLANK_PATTERN.search(str(first.get("question", ""))) else "oe_qa"
    if "option_0" in first or "options" in first:
        return "mc_qa"
    if "caption" in first:
        return "text_video"
    raise AnnotationError(f"{path}: unknown annotation format (first record keys {list(first)})")


def load_any(path: PathLike, split: str = "train"):
    """Load a file in whichever official format it is (for validation tools and tests)."""
    kind = detect_format(path)
    loader = {"pretrain": load_pretrain_captions, "text_video": load_text_video, "mc_qa": load_mc_qa,
              "oe_qa": load_oe_qa, "fib": load_fib, "action": load_action}[kind]
    return kind, loader(path, split)


def load_word_list(source: Any, key: str, option: str, limit: int = 0, nonempty: bool = False) -> Optional[List[str]]:
    """A list of strings given inline or as an annotation JSON (its top-level `key`, or a bare list): an
    open-ended QA answer vocabulary ("vocab"), action class names ("labels"). `option` names the
    setting in errors; `limit` > 0 keeps the first `limit` entries."""
    if source is None:
        return None
    if isinstance(source, (list, tuple)):
        words = [str(v) for v in source]
    else:
        path = Path(str(source))
        if not path.is_file():
            raise FileNotFoundError(f"{option}: file not found: {path}")
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        words = data.get(key) if isinstance(data, dict) else data
        if not isinstance(words, list) or (nonempty and not words) or not all(isinstance(v, str) for v in words):
            raise ValueError(f"{path}: expected a top-level {key!r} list of strings")
    return words[:limit] if limit > 0 else words

