"""Datasets for every task, returning dicts of tensors ready for the model, and `collate`.

Batch keys (docs/architecture.md "Batches"): `video` uint8 `(T,3,H,W)` per sample, `text_ids` /
`text_mask` long `(L,)`, `video_id` str, `index` int, and per task `answer`, `option_ids` /
`option_mask` `(K,L)`, `label`, `vq_tokens` `(T,h,w)`, `caption_ids` / `caption_mask`.

Bad input. An annotation naming a video that no TSV holds is found when the dataset is built; a
row that fails to read or decode is found when it is loaded. With `max_bad_fraction == 0` (the
default) both raise an error naming the annotation file / TSV and the video. With a positive
fraction the sample is skipped (the next one is returned instead), counted, reported through a
warning and `bad_sample_report()`, and once more than that fraction of samples seen so far is bad
(after `MIN_SEEN_FOR_LIMIT` samples) `BadSampleLimitError` stops the run. DataLoader workers count
their own samples (each worker process holds its copy of the dataset).
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from violet_ds.data import annotations as ann
from violet_ds.data.convert import load_vq_tokens
from violet_ds.data.frames import FrameDecodeError, VideoTransform, decode_frames, sample_frame_indices
from violet_ds.data.tokenizer import Tokenizer
from violet_ds.data.tsv import TSVError, TSVFile, resolve_tsv_paths

logger = logging.getLogger(__name__)

TsvSpec = Union[str, Path, Sequence[Union[str, Path]]]
MIN_SEEN_FOR_LIMIT = 20
LENGTH_CHECK_SAMPLES = 1000
"""records whose text lengths are checked against `max_text_len` when a dataset is built (evenly spaced)"""


class BadSampleLimitError(RuntimeError):
    """More than `max_bad_fraction` of the samples seen were unreadable."""


class MissingVideoError(KeyError):
    """An annotation names a video that is in none of the TSV shards."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


# ---------------------------------------------------------------- frames of many shards

class FrameSource:
    """Video id -> base64 frames, across several TSV shards (path, glob or comma-separated list)."""

    def __init__(self, tsv: TsvSpec, frame_column: Optional[int] = None):
        self.paths = resolve_tsv_paths(tsv)
        self.files = [TSVFile(path, frame_column=frame_column) for path in self.paths]
        self.location: dict[str, tuple[int, int]] = {}
        for file_index, tsv_file in enumerate(self.files):
            for row, key in enumerate(tsv_file.keys()):
                # the first shard wins for duplicated ids, like a seek in shard order would
                self.location.setdefault(key, (file_index, row))

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.location

    def __len__(self) -> int:
        return len(self.location)

    def keys(self) -> list[str]:
        return list(self.location)

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.paths[:3]) + (f" (+{len(self.paths) - 3} more)" if len(self.paths) > 3 else "")

    def frames(self, video_id: str) -> list[str]:
        try:
            file_index, row = self.location[video_id]
        except KeyError:
            raise MissingVideoError(f"video {video_id!r} is in none of the TSVs {self.describe()}") from None
        tsv_file = self.files[file_index]
        key, frames = tsv_file.frames(row)
        if key != video_id:
            raise TSVError(f"{tsv_file.path}: row {row} holds {key!r}, expected {video_id!r} (stale index)")
        return frames

    def where(self, video_id: str) -> str:
        file_index, row = self.location.get(video_id, (None, None))
        return f"{self.files[file_index].path} row {row}" if file_index is not None else "no TSV"


class ClipReader:
    """Reads one clip: temporal sampling on the stored frames, decoding only the chosen ones, transform."""

    def __init__(self, num_frames: int, size: int, train: bool, spatial: str = "crop", flip: bool = False,
                 decoder: str = "auto", short: str = "repeat", scale: float = 1.0, sampling: str = "auto",
                 frame_order: str = "keep"):
        # `fixed`: evaluation-style clips (segment centres, centre crop, no flip/scale) even in training,
        # which pre-extracted MVM targets (`violet-ds extract-targets`) need to describe the clip
        if sampling not in ("auto", "fixed"):
            raise ValueError(f"unknown clip sampling {sampling!r} (auto, fixed)")
        self.num_frames, self.train, self.decoder, self.short = num_frames, train, decoder, short
        self.sampling = sampling
        if frame_order not in ("keep", "shuffle"):
            raise ValueError(f"unknown frame_order {frame_order!r} (keep, shuffle)")
        self.frame_order = frame_order
        self.random_clip = train and sampling == "auto"
        self.transform = VideoTransform(size, train=self.random_clip, mode=spatial, flip=flip, scale=scale)
        self.size = size

    def __call__(self, frames: list[str], generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        indices = sample_frame_indices(len(frames), self.num_frames, self.random_clip, generator, self.short)
        if self.frame_order == "shuffle":
            indices = indices[self.other_order(len(indices), frames, generator)]
        unique, inverse = torch.unique(indices, return_inverse=True)
        decoded = decode_frames([frames[i] for i in unique.tolist()], self.decoder, min_size=self.size)
        video = self.transform(decoded, generator)[inverse]
        return video, indices

    def other_order(self, count: int, frames: list[str], generator: Optional[torch.Generator]) -> torch.Tensor:
        """A random permutation of `count` frames other than the identity; at evaluation a fixed function of the
        clip's stored frames, so that every evaluation sees the same shuffled clips."""
        if generator is None and not self.random_clip:
            generator = torch.Generator().manual_seed(zlib.crc32(str(frames[0])[-256:].encode()))
        order = torch.randperm(count, generator=generator)
        if count > 1 and bool((order == torch.arange(count)).all()):
            order = order.roll(1)
        return order


def _per_pairing(texts: list, pairs: list, run) -> list:
    """`run(texts, pairs or None)` on the texts without a pair and on those with one (the tokenizer takes one kind
    per call); the results in the order of `texts`."""
    out: list = [None] * len(texts)
    for paired in (False, True):
        which = [k for k, pair in enumerate(pairs) if (pair is not None) == paired]
        if which:
            results = run([texts[k] for k in which], [pairs[k] for k in which] if paired else None)
            for k, result in zip(which, results):
                out[k] = result
    return out


# ---------------------------------------------------------------- base class

class SharedCounts:
    """(bad, seen) sample counters in shared memory, so that forked DataLoader workers add to the parent's.

    A copy made by pickling (spawned workers) starts a private count instead; nothing fails.
    """

    def __init__(self):
        try:
            self.values = multiprocessing.Array("q", 2)
        except (OSError, ImportError):  # no shared memory (some sandboxes): counts stay per process
            self.values = None
        self.local = [0, 0]

    def add(self, bad: int, seen: int) -> None:
        if self.values is None:
            self.local[0] += bad
            self.local[1] += seen
            return
        with self.values.get_lock():
            self.values[0] += bad
            self.values[1] += seen

    def get(self) -> tuple[int, int]:
        if self.values is None:
            return self.local[0], self.local[1]
        with self.values.get_lock():
            return int(self.values[0]), int(self.values[1])

    def __getstate__(self):
        return {"values": None, "local": [0, 0]}


class VideoTextDataset(Dataset):
    """Common machinery: frame source, clip reader, tokenizer, bad-sample policy."""

    def __init__(self, tsv: TsvSpec, tokenizer: Optional[Tokenizer], num_frames: int = 5, size: int = 224,
                 max_text_len: int = 32, train: bool = False, *, spatial: str = "crop", flip: bool = False,
                 decoder: str = "auto", short: str = "repeat", max_bad_fraction: float = 0.0,
                 frame_column: Optional[int] = None, source: Optional[FrameSource] = None, sampling: str = "auto",
                 frame_order: str = "keep"):
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self.source = source if source is not None else FrameSource(tsv, frame_column)
        self.tokenizer = tokenizer
        self.num_frames, self.size, self.max_text_len, self.train = num_frames, size, max_text_len, train
        self.reader = ClipReader(num_frames, size, train, spatial, flip, decoder, short, sampling=sampling,
                                 frame_order=frame_order)
        self.max_bad_fraction = max_bad_fraction
        self.bad_samples: list[tuple[int, str, str]] = []
        self.missing_videos: list[str] = []
        self.samples_seen = 0
        self.shared_counts = SharedCounts()

    # ---- annotation / TSV consistency
    def _keep_present(self, records: list, annotation_path: Union[str, Path], split: str) -> list:
        missing = [(i, r.video) for i, r in enumerate(records) if r.video not in self.source]
        if not missing:
            return records
        first_index, first_video = missing[0]
        message = (f"{annotation_path}: {split}[{first_index}] names video {first_video!r} which is in none "
                   f"of the TSVs {self.source.describe()} ({len(missing)} of {len(records)} records affected)")
        if self.max_bad_fraction == 0.0:
            raise MissingVideoError(message)
        if len(missing) / len(records) > self.max_bad_fraction:
            raise BadSampleLimitError(message + f": more than max_bad_fraction={self.max_bad_fraction}")
        logger.warning("skipping %d records: %s", len(missing), message)
        self.missing_videos = sorted({video for _, video in missing})
        dropped = {i for i, _ in missing}
        return [r for i, r in enumerate(records) if i not in dropped]

    # ---- text longer than max_text_len
    def _check_text_length(self, records: list, texts_of, where: str, options: bool = False) -> None:
        """Warn when texts will be cut at `max_text_len`, and (`options`) when the cut makes a record's options equal.

        `texts_of(record)` gives `(texts, pairs)` (pairs None or one per text). Checks up to
        LENGTH_CHECK_SAMPLES records, evenly spaced, so building a large dataset stays fast. A cut text is
        normal for long captions; options (question + option, cut longest first) that become identical
        cannot be told apart by any model, and the cut is silent otherwise.
        """
        if self.tokenizer is None or not records:
            return
        checked = records[::max(1, len(records) // LENGTH_CHECK_SAMPLES)]
        texts, pairs, owner = [], [], []
        for number, record in enumerate(checked):
            record_texts, record_pairs = texts_of(record)
            texts += record_texts
            pairs += record_pairs if record_pairs is not None else [None] * len(record_texts)
            owner += [number] * len(record_texts)
        length = _per_pairing(texts, pairs, self.tokenizer.lengths)
        long = [k for k, n in enumerate(length) if n > self.max_text_len]
        if not long:
            return
        worst = max(long, key=length.__getitem__)
        example = texts[worst] if pairs[worst] is None else f"{texts[worst]} [SEP] {pairs[worst]}"
        logger.warning("%s: %d of %d texts checked are longer than data.max_text_len=%d tokens (longest %d, %r); "
                       "their end is cut%s. Raise data.max_text_len to keep them whole.", where, len(long), len(texts),
                       self.max_text_len, length[worst], example,
                       " (question + option: the longer part first)" if pairs[worst] is not None else "")
        if not options:
            return
        # the texts of every record with a cut text, as the model gets them; two different ones that read the same
        cut = {owner[k] for k in long}
        mine = [k for k, number in enumerate(owner) if number in cut]
        rows = _per_pairing([texts[k] for k in mine], [pairs[k] for k in mine], lambda t, p: [
            tuple(row) for row in self.tokenizer.encode(t, self.max_text_len, p)[0].tolist()])
        first: dict = {}
        equal: dict = {}
        for k, row in zip(mine, rows):
            other = first.setdefault((owner[k], row), k)
            if (texts[other], pairs[other]) != (texts[k], pairs[k]):
                equal.setdefault(owner[k], (pairs[other] or texts[other], pairs[k] or texts[k]))
        if equal:
            logger.warning("%s: in %d of %d records checked, two different options become the same text when cut at "
                           "data.max_text_len=%d (e.g. %r and %r): no model can tell them apart. Raise "
                           "data.max_text_len.", where, len(equal), len(checked), self.max_text_len,
                           *next(iter(equal.values())))

    # ---- helpers for subclasses
    def encode_text(self, text: str, pair: Optional[str] = None, max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer")
        ids, mask = self.tokenizer.encode([text], max_len or self.max_text_len, None if pair is None else [pair])
        return ids[0], mask[0]

    def clip_of_video(self, video_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The clip of `video_id` (from this dataset's TSVs through its `ClipReader`) and its frame indices."""
        return self.reader(self.source.frames(video_id))

    def load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    # ---- Dataset API with the bad-sample policy
    def __getitem__(self, index: int) -> dict[str, Any]:
        length = len(self)
        for attempt in range(length):
            current = (index + attempt) % length
            self.samples_seen += 1
            self.shared_counts.add(0, 1)
            try:
                sample = self.load(current)
            except (TSVError, FrameDecodeError, MissingVideoError) as err:
                video = self.video_of(current)
                message = f"sample {current} (video {video!r}, {self.source.where(video)}): {err}"
                if self.max_bad_fraction == 0.0:
                    raise type(err)(message) from err
                self.bad_samples.append((current, video, str(err)))
                self.shared_counts.add(1, 0)
                fraction = len(self.bad_samples) / self.samples_seen
                logger.warning("skipping bad %s [%d bad of %d seen]", message, len(self.bad_samples), self.samples_seen)
                if self.samples_seen >= MIN_SEEN_FOR_LIMIT and fraction > self.max_bad_fraction:
                    raise BadSampleLimitError(f"{len(self.bad_samples)} of {self.samples_seen} samples were bad "
                                              f"(> max_bad_fraction={self.max_bad_fraction}); last: {message}") from err
                continue
            sample.setdefault("index", current)
            return sample
        raise BadSampleLimitError(f"every sample of {type(self).__name__} failed to load")

    # subclasses keep their annotation records (each with a `.video`) in `self.records`
    records: list = []

    def __len__(self) -> int:
        return len(self.records)

    def video_of(self, index: int) -> str:
        return self.records[index].video

    def bad_sample_counts(self) -> tuple[int, int]:
        """(bad, seen) samples of this process and its DataLoader workers together."""
        counts = getattr(self, "shared_counts", None)
        return counts.get() if counts is not None else (len(self.bad_samples), self.samples_seen)

    def bad_sample_report(self) -> dict[str, Any]:
        return {"seen": self.samples_seen, "bad": len(self.bad_samples),
                "bad_videos": Counter(v for _, v, _ in self.bad_samples).most_common(10),
                "missing_videos": len(self.missing_videos)}


# ---------------------------------------------------------------- pretraining

class PretrainDataset(VideoTextDataset):
    """Video-text (or image-text: one-frame rows) pairs from `txt_*.json` captions + TSV shards.

    Training draws one of a video's captions at random, evaluation takes the first. `kind="image"`
    rows hold one frame, repeated to `num_frames` (set num_frames=1 for a true one-frame clip).
    `vq` is a `.npz` sidecar (`violet-ds convert-pickle`) of DALL-E tokens `(N, h, w)` per video;
    its rows follow the frames, so the clip's frame indices pick its token maps (`vq_tokens`).
    VQ tokens describe the stored frame: use `spatial="resize"` and no flip with them.
    """

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                 num_frames: int = 4, size: int = 224, max_text_len: int = 32, train: bool = True,
                 kind: Literal["video", "image"] = "video", vq: Optional[str] = None, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.kind = kind
        self.annotation_path = annotations
        self.records = self._keep_present(ann.load_pretrain_captions(annotations, split), annotations, split)
        self._check_text_length(self.records, lambda r: (r.captions, None), f"{annotations} ({split})")
        self.vq_tokens = None
        if vq is not None:
            self.vq_tokens = load_vq_tokens(vq)
            absent = [r.video for r in self.records if r.video not in self.vq_tokens]
            if absent:
                raise MissingVideoError(f"{vq}: no VQ tokens for video {absent[0]!r} ({len(absent)} videos missing)")

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        frames = self.source.frames(record.video)
        video, indices = self.reader(frames)
        caption = random.choice(record.captions) if self.train else record.captions[0]
        text_ids, text_mask = self.encode_text(caption)
        sample = {"video": video, "text_ids": text_ids, "text_mask": text_mask, "video_id": record.video}
        if self.vq_tokens is not None:
            tokens = self.vq_tokens[record.video]
            # token rows align with stored frames; map proportionally if the counts differ
            rows = (indices * len(tokens)) // max(1, len(frames))
            sample["vq_tokens"] = torch.from_numpy(tokens[rows.numpy()].astype(np.int64))
        return sample


class MixedDataset(Dataset):
    """Several datasets as one; `weights` oversample (or undersample) each by repeating its indices.

    Dataset i contributes `round(len_i * weight_i)` indices, so a resumable sampler over the mix stays
    exact. All parts must produce the same keys and clip shape (same num_frames and size).
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Optional[Sequence[float]] = None):
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        weights = list(weights) if weights is not None else [1.0] * len(datasets)
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.lengths = [max(1, round(len(d) * w)) if w > 0 else 0 for d, w in zip(datasets, weights)]
        self.offsets = np.cumsum([0] + self.lengths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        dataset = self.datasets[part]
        sample = dataset[(index - int(self.offsets[part])) % len(dataset)]
        sample["index"] = index
        return sample


# ---------------------------------------------------------------- downstream tasks

class MCQADataset(VideoTextDataset):
    """Multiple-choice QA: `option_ids`/`option_mask` `(K, L)`, `answer` (option index) and `answer_key` (the
    right option's text, lower-cased with its spaces collapsed, as a CRC-32: the same answer text gives the same key
    in every record, split and source).

    TGIF style (a question): each option is encoded as the pair `[CLS] question [SEP] option [SEP]`.
    MSRVTT-MC style (no question): each option is a caption on its own.
    """

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                 num_frames: int = 5, size: int = 224, max_text_len: int = 25, train: bool = False,
                 num_options: Optional[int] = None, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.annotation_path = annotations
        records = ann.load_mc_qa(annotations, split, num_options)
        counts = {len(r.options) for r in records}
        if len(counts) > 1:
            raise ann.AnnotationError(f"{annotations}: {split}: records have different option counts {sorted(counts)}")
        self.records = self._keep_present(records, annotations, split)
        self._check_text_length(self.records, self._option_texts, f"{annotations} ({split})", options=True)

    @staticmethod
    def _option_texts(record: ann.MCRecord) -> tuple[list[str], Optional[list[str]]]:
        if record.question.strip():
            return [record.question] * len(record.options), list(record.options)
        return list(record.options), None

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video, _ = self.clip_of_video(record.video)
        if record.question.strip():
            ids, mask = self.tokenizer.encode([record.question] * len(record.options), self.max_text_len,
                                              pairs=record.options)
        else:
            ids, mask = self.tokenizer.encode(record.options, self.max_text_len)
        answer_text = " ".join(record.options[record.answer].lower().split())
        return {"video": video, "option_ids": ids, "option_mask": mask, "answer": record.answer,
                "answer_key": zlib.crc32(answer_text.encode("utf-8")), "video_id": record.video}


class OEQADataset(VideoTextDataset):
    """Open-ended QA: `text_ids` of the question, `answer` index into `vocab` (-1 = unanswerable).

    `answer_token` is the tokenizer id of the answer word (LAVENDER answers at [MASK] through the MLM
    head), -1 when the answer is not a single word piece or unanswerable.
    """

    loader = staticmethod(ann.load_oe_qa)

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                 num_frames: int = 5, size: int = 224, max_text_len: int = 25, train: bool = False,
                 vocab_size: Optional[int] = None, drop_unanswerable_in_train: bool = True, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.annotation_path = annotations
        loaded = self.loader(annotations, split, vocab_size)
        self.vocab = loaded.vocab
        records = loaded.records
        if train and drop_unanswerable_in_train:
            # nothing to learn from them; evaluation keeps them (they count as wrong)
            records = [r for r in records if r.answer != ann.UNANSWERABLE]
        self.records = self._keep_present(records, annotations, split)
        self.unanswerable = sum(r.answer == ann.UNANSWERABLE for r in self.records)
        self._check_text_length(self.records, lambda r: ([self.question_text(r)], None), f"{annotations} ({split})")
        self.answer_token_ids = [tokenizer.token_id(word) for word in self.vocab]

    def question_text(self, record: ann.OERecord) -> str:
        return record.question

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video, _ = self.clip_of_video(record.video)
        text_ids, text_mask = self.encode_text(self.question_text(record))
        if record.answer_text is not None:
            answer_token = self.tokenizer.token_id(record.answer_text)
        else:
            answer_token = self.answer_token_ids[record.answer] if record.answer >= 0 else -1
        return {"video": video, "text_ids": text_ids, "text_mask": text_mask, "answer": record.answer,
                "answer_token": answer_token, "video_id": record.video}


class FiBDataset(OEQADataset):
    """Fill-in-the-blank (LSMDC-FiB): the blank in the sentence becomes the tokenizer's [MASK]."""

    loader = staticmethod(ann.load_fib)

    def question_text(self, record: ann.OERecord) -> str:
        return ann.BLANK_PATTERN.sub(self.tokenizer.hf.mask_token, record.question, count=1)


class RetrievalDataset(VideoTextDataset):
    """Retrieval training pairs: one sample per caption record (video + `text_ids`)."""

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                 num_frames: int = 5, size: int = 224, max_text_len: int = 25, train: bool = True, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.annotation_path = annotations
        self.records = self._keep_present(ann.load_text_video(annotations, split), annotations, split)
        self._check_text_length(self.records, lambda r: ([r.caption], None), f"{annotations} ({split})")

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video, _ = self.clip_of_video(record.video)
        text_ids, text_mask = self.encode_text(record.caption)
        return {"video": video, "text_ids": text_ids, "text_mask": text_mask, "video_id": record.video}


class RetrievalTextDataset(Dataset):
    """Evaluation texts: `text_ids`, `text_mask`, `video_index` (row of the matching video in
    `RetrievalVideoDataset`, i.e. the ground truth column of the score matrix), `index`."""

    def __init__(self, records: list[ann.TextVideoRecord], video_ids: list[str], tokenizer: Tokenizer,
                 max_text_len: int):
        self.records, self.tokenizer, self.max_text_len = records, tokenizer, max_text_len
        position = {video: i for i, video in enumerate(video_ids)}
        self.video_index = [position[r.video] for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ids, mask = self.tokenizer.encode([record.caption], self.max_text_len)
        return {"text_ids": ids[0], "text_mask": mask[0], "video_index": self.video_index[index],
                "video_id": record.video, "index": index}


class VideoDataset(VideoTextDataset):
    """Clips only: every video of the given ids (default: every row of the TSVs), `video`, `video_id`, `index`.

    Used for retrieval evaluation (each video once), target extraction, VIMPAC and benchmarks.
    `clips > 1` adds `video_1`, ... : further independent clips of the same video (VIMPAC's positives).
    """

    def __init__(self, tsv: TsvSpec, video_ids: Optional[Sequence[str]] = None, num_frames: int = 5,
                 size: int = 224, train: bool = False, clips: int = 1, source: Optional[FrameSource] = None,
                 **options):
        super().__init__(tsv, None, num_frames, size, 0, train, source=source, **options)
        ids = list(video_ids) if video_ids is not None else self.source.keys()
        self.video_ids = self._keep_present([ann.ActionRecord(v, 0) for v in ids], "video list", "videos")
        self.video_ids = [r.video for r in self.video_ids]
        self.clips = clips

    def __len__(self) -> int:
        return len(self.video_ids)

    def video_of(self, index: int) -> str:
        return self.video_ids[index]

    def load(self, index: int) -> dict[str, Any]:
        video_id = self.video_ids[index]
        frames = self.source.frames(video_id)
        sample = {"video": self.reader(frames)[0], "video_id": video_id}
        for clip in range(1, self.clips):
            sample[f"video_{clip}"] = self.reader(frames)[0]
        return sample


class MultiClipVideoDataset(VideoDataset):
    """Each video once, as `clips` evenly offset deterministic clips `(clips, T, 3, H, W)` (multi-clip
    testing: the task averages the video encoder outputs over the clips); `clips == 1` gives `(T, 3, H, W)`
    with the standard centre-of-segment sampling."""

    def __init__(self, *args, clips: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        if clips < 1:
            raise ValueError(f"data.eval_clips must be >= 1, got {clips}")
        self.eval_clips = clips

    def clip_indices(self, num_available: int) -> torch.Tensor:
        """`(clips, T)` stored-frame indices: clip c samples each of T segments at fraction (c+0.5)/clips."""
        frames = self.num_frames
        if num_available < frames or self.eval_clips == 1:
            one = sample_frame_indices(num_available, frames, False)
            return one[None].expand(self.eval_clips, -1)
        segment = num_available / frames
        fraction = (torch.arange(self.eval_clips, dtype=torch.float64)[:, None] + 0.5) / self.eval_clips
        positions = (torch.arange(frames, dtype=torch.float64)[None, :] + fraction) * segment
        return positions.floor().long().clamp(0, num_available - 1)

    def load(self, index: int) -> dict[str, Any]:
        video_id = self.video_ids[index]
        frames = self.source.frames(video_id)
        if self.eval_clips == 1:
            return {"video": self.reader(frames)[0], "video_id": video_id}
        indices = self.clip_indices(len(frames))
        if self.reader.frame_order == "shuffle":
            indices = indices[:, self.reader.other_order(self.num_frames, frames, None)]
        unique, inverse = torch.unique(indices.flatten(), return_inverse=True)
        decoded = decode_frames([frames[i] for i in unique.tolist()], self.reader.decoder, min_size=self.size)
        video = self.reader.transform(decoded, None)[inverse]
        return {"video": video.view(self.eval_clips, self.num_frames, *video.shape[1:]), "video_id": video_id}


def build_retrieval_eval(tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                         num_frames: int = 5, size: int = 224, max_text_len: int = 25, clips: int = 1,
                         **options) -> dict[str, Dataset]:
    """Retrieval evaluation as two datasets: `texts` (every caption) and `videos` (every video once, as
    `clips` clips: `MultiClipVideoDataset`).

    Score matrix rows follow `texts`, columns follow `videos`; `texts[i]["video_index"]` is the
    correct column. Videos appear in order of first mention.
    """
    probe = VideoTextDataset(tsv, tokenizer, num_frames, size, max_text_len, False, **options)
    records = probe._keep_present(ann.load_text_video(annotations, split), annotations, split)
    video_ids = list(dict.fromkeys(r.video for r in records))
    videos = MultiClipVideoDataset(tsv, video_ids, num_frames, size, train=False, source=probe.source, clips=clips,
                                   **options)
    return {"texts": RetrievalTextDataset(records, video_ids, tokenizer, max_text_len), "videos": videos}


class CaptionDataset(VideoTextDataset):
    """Captioning. Train: one sample per caption (`caption_ids`, `caption_mask`). Eval: each video
    once with `captions` (list of reference strings) for CIDEr."""

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str, tokenizer: Tokenizer,
                 num_frames: int = 5, size: int = 224, max_text_len: int = 25, train: bool = True, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.annotation_path = annotations
        records = self._keep_present(ann.load_text_video(annotations, split), annotations, split)
        if train:
            self.records = records
        else:
            grouped: dict[str, list[str]] = {}
            for record in records:
                grouped.setdefault(record.video, []).append(record.caption)
            self.records = [ann.CaptionRecord(video, captions) for video, captions in grouped.items()]

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video, _ = self.clip_of_video(record.video)
        if self.train:
            ids, mask = self.encode_text(record.caption)
            return {"video": video, "caption_ids": ids, "caption_mask": mask, "video_id": record.video}
        return {"video": video, "captions": list(record.captions), "video_id": record.video}


class ActionDataset(VideoTextDataset):
    """Action classification: `video` and `label` (class index); `classes` holds the names."""

    def __init__(self, tsv: TsvSpec, annotations: Union[str, Path], split: str,
                 tokenizer: Optional[Tokenizer] = None, num_frames: int = 5, size: int = 224,
                 max_text_len: int = 0, train: bool = False, **options):
        super().__init__(tsv, tokenizer, num_frames, size, max_text_len, train, **options)
        self.annotation_path = annotations
        loaded = ann.load_action(annotations, split)
        self.classes = loaded.labels
        self.records = self._keep_present(loaded.records, annotations, split)

    @property
    def num_classes(self) -> int:
        return len(self.classes) or (max(r.label for r in self.records) + 1)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        video, _ = self.clip_of_video(record.video)
        return {"video": video, "label": record.label, "video_id": record.video}


# ---------------------------------------------------------------- collate

def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of sample dicts: tensors -> stacked, ints/floats/bools -> tensor, others -> list."""
    if not samples:
        raise ValueError("collate got an empty batch")
    keys = list(samples[0])
    for number, sample in enumerate(samples[1:], start=1):
        if list(sample) != keys:
            raise ValueError(f"collate: sample {number} has keys {sorted(sample)}, sample 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"collate: key {key!r} has different shapes {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif isinstance(first, bool):
            batch[key] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, (int, np.integer)):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        elif isinstance(first, (float, np.floating)):
            batch[key] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        else:
            batch[key] = values
    return batch
