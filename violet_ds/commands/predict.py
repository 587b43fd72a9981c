"""`violet-ds predict`: a trained model on the user's own video files, one JSON line per answer.

The command checks its arguments, loads a `violet_ds.predict.Predictor` and writes its answers (stdout or
`--output`); an unreadable video gives `{"video", "id", "error"}` and the run goes on. The exit code is 1
only when no video could be read.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, TextIO, Union

import torch

from violet_ds.data.annotations import load_word_list
from violet_ds.data.extract import VIDEO_EXTENSIONS, list_inputs
from violet_ds.predict import FeatureCache, Predictor, VideoReadError, default_cache_dir
from violet_ds.progress import progress as progress_bar
from violet_ds.progress import quiet

FLAGS = {"qa_mc": "--options", "qa_oe": "--question", "rank": "--captions", "retrieve": "--query"}
"""The argument each task needs."""


def _pick_task(task: str, question, options, captions, query) -> str:
    if task != "auto":
        return task
    if query:
        return "retrieve"
    if options:
        return "qa_mc"
    if captions:
        return "rank"
    if question:
        return "qa_oe"
    return "caption"


def _check_sizes(**sizes: Optional[int]) -> None:
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name}: must be >= 1, got {value}")


def _cache_path(cache: Optional[str], fingerprint: str) -> Optional[Path]:
    if cache is None or cache.lower() == "none":
        return None
    if cache == "auto":
        return default_cache_dir() / f"{fingerprint}.pt"
    return Path(cache)


def _read_vocab(path: str) -> List[str]:
    file = Path(path)
    if file.suffix == ".json":
        return load_word_list(str(file), "vocab", "answer vocabulary")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _warn(message: str) -> None:
    print(f"violet-ds predict: warning: {message}", file=sys.stderr, flush=True)


def _load(model: str, progress: bool, **options) -> Predictor:
    """The predictor; stdout carries the JSON lines only, so what loading prints goes to stderr (DeepSpeed's
    checkpoint consolidation reports to the library log), its progress only with --progress."""
    with contextlib.redirect_stdout(sys.stderr), (contextlib.nullcontext() if progress else quiet()):
        predictor = Predictor.load(model, **options)
    tokenizer = predictor.tokenizer
    if tokenizer is not None and tokenizer.is_demo:
        _warn(f"{model} is a demo model (trained on the synthetic demo data, a vocabulary of "
              f"{tokenizer.vocab_size} word pieces): its answers on real videos mean nothing")
    return predictor


class _Answers:
    """The JSON lines of a run, and the count of videos that gave an error instead of an answer."""

    def __init__(self, out: TextIO):
        self.out = out
        self.failures = 0

    def emit(self, record: Dict[str, Any]) -> None:
        try:
            # NaN / Infinity are not JSON; a score that is not finite is no answer either
            line = json.dumps(record, allow_nan=False)
        except ValueError:
            self.error(Path(str(record.get("video", ""))),
                       "the model's scores are not finite (NaN/Inf): its weights give no usable output "
                       "(a diverged run?); use a checkpoint from before the loss went non-finite")
            return
        self.out.write(line + "\n")
        self.out.flush()

    def error(self, path: Path, message: str) -> None:
        self.failures += 1
        print(f"violet-ds predict: skipped {path}: {message}", file=sys.stderr, flush=True)
        self.emit({"video": str(path), "id": path.stem, "error": message})


def _answer(predictor: Predictor, task: str, clip: torch.Tensor, question, options, captions, top_k: int,
            beam_size: int, max_gen_len: int) -> Dict[str, Any]:
    """The task's fields of one video's record."""
    if task == "caption":
        return {"caption": predictor.caption(clip, beam_size, max_gen_len)[0]}
    tokens = predictor.encode(clip)
    if task == "qa_mc":
        return {"question": question, **predictor.multiple_choice(tokens, options, question)}
    if task == "qa_oe":
        answers = predictor.open_ended(tokens, question, top_k)
        return {"question": question, "answer": answers[0]["answer"], "top": answers}
    return {"ranking": predictor.rank_captions(tokens, captions)}


def predict(model: str, videos: Union[str, List[str]], question: Optional[str] = None,
            options: Optional[List[str]] = None, captions: Optional[List[str]] = None, query: Optional[str] = None,
            task: Literal["auto", "qa_mc", "qa_oe", "rank", "retrieve", "caption"] = "auto", top_k: int = 5,
            output: Optional[str] = None, tokenizer: Optional[str] = None, tag: Optional[str] = None,
            num_frames: Optional[int] = None, image_size: Optional[int] = None, stored_frames: Optional[int] = None,
            answer_vocab: Optional[str] = None, cache: Optional[str] = "auto", beam_size: int = 1,
            max_gen_len: int = 20, device: str = "auto", progress: bool = True) -> int:
    """Run a trained model on video files (mp4, ...): QA, caption ranking, text->video retrieval, captioning.

    Prints one JSON line per video (per ranked video for retrieval), each naming the video.

    Args:
        model: a model directory (export --format dir), a run directory, or an official checkpoint (.pt).
        videos: video files, folders (searched recursively), globs or list files (`path` per line): one, or
            several (`--videos a.mp4 b.mp4`, as a shell glob gives them).
        question: the question (open-ended QA; with --options, multiple-choice QA).
        options: answer options for multiple-choice QA, e.g. --options yes no.
        captions: captions to rank for each video.
        query: a text to retrieve videos for (ranks every video of --videos).
        task: auto (from the arguments given), qa_mc, qa_oe, rank, retrieve or caption.
        top_k: answers listed for open-ended QA.
        output: write the JSON lines to this file instead of stdout.
        tokenizer: tokenizer directory (default: the model's; packaged BERT-uncased for official checkpoints).
        tag: checkpoint tag of a run directory (default: its latest).
        num_frames: frames per clip (default: the model's training setting; 5 for official checkpoints).
        image_size: frame size in pixels (default: the model's training setting; 224 for official checkpoints).
        stored_frames: frames the extraction step would keep before the clip is sampled (default num_frames).
        answer_vocab: open-ended answers to choose from: a JSON annotation file with "vocab", or a text file
            with one answer per line (default: the model's answer vocabulary, else every word piece).
        cache: retrieval feature cache file; auto = under ~/.cache/violet_ds/features; none = no cache.
        beam_size: captioning beam size (1 = greedy).
        max_gen_len: captioning length limit in words.
        device: auto (cuda when available), cpu, cuda, cuda:1, ...
        progress: progress on stderr: a bar on terminals, dated lines elsewhere (log files).
    """
    _check_sizes(num_frames=num_frames, image_size=image_size, stored_frames=stored_frames, top_k=top_k,
                 beam_size=beam_size, max_gen_len=max_gen_len)
    chosen = _pick_task(task, question, options, captions, query)
    needs = {"qa_mc": options, "qa_oe": question, "rank": captions, "retrieve": query}
    if chosen in needs and not needs[chosen]:
        raise ValueError(f"task {chosen} needs {FLAGS[chosen]}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = _read_vocab(answer_vocab) if answer_vocab else None
    predictor = _load(model, progress, tokenizer=tokenizer, tag=tag, device=device, num_frames=num_frames,
                      image_size=image_size, stored_frames=stored_frames, answer_vocab=vocab)
    specs = [videos] if isinstance(videos, str) else list(videos)
    if not specs:
        raise ValueError("--videos: no video given")
    # every video once, in the order given
    inputs = list(dict.fromkeys(path for spec in specs for _, path in list_inputs(spec, VIDEO_EXTENSIONS)))
    with (open(output, "w") if output else contextlib.nullcontext(sys.stdout)) as out:
        answers = _Answers(out)
        if chosen == "retrieve":
            features = FeatureCache(_cache_path(cache, predictor.fingerprint), predictor.fingerprint, warn=_warn)
            for row in predictor.retrieve(query, inputs, features, progress, on_error=answers.error):
                answers.emit({"query": query, **row})
        else:
            for path in (progress_bar(inputs, desc=chosen, unit="video", leave=False) if progress else inputs):
                try:
                    clip = predictor.read(path)[None]
                except VideoReadError as error:
                    answers.error(path, str(error))
                    continue
                answers.emit({"video": str(path), "id": path.stem, "task": chosen,
                              **_answer(predictor, chosen, clip, question, options, captions, top_k, beam_size,
                                        max_gen_len)})
    return 1 if inputs and answers.failures == len(inputs) else 0
