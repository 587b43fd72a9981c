"""Synthetic demo data: short videos of coloured shapes moving in a direction, in every official format.

`violet-ds make-demo-data --out data/demo` renders the videos with numpy, encodes them to mp4 with
PyAV, runs the real extraction (`run_extraction`, the code behind `violet-ds extract-frames`) to TSV
shards, writes annotation JSON in each official format and builds a WordPiece vocabulary from all the
text (split by the `tokenizers` BERT pre-tokeniser, saved as a `tokenizers` + BERT directory).
Output is a function of the arguments (seed included): files are byte-identical across runs.

Content. Each video shows one shape (circle, square, triangle) of one colour (red, green, blue,
yellow, white) and size (small, big) that moves left, right, up, down or stays still over
`render_frames` frames. Colour, shape and size are visible in any single frame; the motion needs at
least two frames, so the motion questions, MC options, action labels and the direction blank test
temporal modelling. Still images (one shape, no motion) form the image-text part. `num_sequences`
more videos (default none; ids seqNNNN, pretraining captions only, all in the train split) show two moves
one after the other ("a big red circle moves left then up"): captions whose word order follows the order
of events (docs/results.md#temporal-order says what they do to the demo pretraining).

Layout of `out/` (stable names, referenced by configs):
```
videos/demoNNNN.mp4           the rendered videos (ids demo0000, demo0001, ...)
images/imgNNNN.png            the still images (ids img0000, ...)
video_000.tsv, video_001.tsv, ...  (+ .lineidx) frame TSV shards of all videos (`num_frames` frames,
                              short side `size` px); use the glob `out/video_*.tsv`
image_000.tsv (+ .lineidx)    one-frame rows of the images; glob `out/image_*.tsv`
txt_pretrain.json             video captions  {"train"|"val": {video_id: [caption, ...]}} (+ the sequences)
txt_image.json                image captions  {"train"|"val": {image_id: [caption, ...]}}
txt_retrieval.json            {"train"|"val"|"test": [{"video", "caption"}]}
txt_caption.json              captioning, same format as retrieval (all references per video)
txt_qamc.json                 TGIF-style MC: {"question", "option_0".."option_4", "answer", "video"}
txt_capmc.json                MSRVTT-MC-style MC: 5 captions per video (option_0..4), no question
txt_qaoe.json                 open-ended QA {"video", "question", "answer"} + "vocab"; some test
                              questions are unanswerable (answer -1)
txt_fib.json                  fill-in-the-blank ("... moves _____ .") + "vocab"
txt_action.json               {"train"|"val"|"test": [{"video", "label"}], "labels": [5 motion classes]}
tokenizer/                    BERT-style WordPiece tokenizer (vocab.txt, tokenizer.json, configs)
demo.json                     the arguments and counts of this build
```
Splits: 70% of the videos train, 15% val, 15% test (pretraining uses train and val).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import av
import numpy as np
import tokenizers
from PIL import Image

from .extract import ExtractOptions, list_inputs, run_extraction
from .tokenizer import DEMO_MARKER, Tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 220, 40),
          "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
MOTIONS = ("left", "right", "up", "down", "still")
MOTION_PHRASES = {"left": "move left", "right": "move right", "up": "move up", "down": "move down",
                  "still": "stay still"}
ACTION_LABELS = ["moving left", "moving right", "moving up", "moving down", "staying still"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class DemoVideo:
    video: str
    color: str
    shape: str
    size: str
    motion: str
    split: str
    then: str = ""
    """a second move after `motion` (the clip's second half), "" for one motion"""


# ---------------------------------------------------------------- rendering

STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


def _path(motion: str, then: str, frames: int, travel: float) -> np.ndarray:
    """`(frames, 2)` offsets from the start: `motion` over the clip, or `motion` then `then` over its two halves."""
    progress = np.linspace(0.0, 1.0, frames)[:, None]
    if not then:
        return travel * progress * np.array(STEPS[motion])
    first, second = np.clip(2 * progress, 0, 1), np.clip(2 * progress - 1, 0, 1)
    return travel * (first * np.array(STEPS[motion]) + second * np.array(STEPS[then]))


def render_clip(color: str, shape: str, size: str, motion: str, frames: int, side: int,
                rng: np.random.Generator, then: str = "") -> np.ndarray:
    """uint8 `(frames, side, side, 3)` clip of one shape moving (vectorised over frames and pixels); with `then`,
    two moves of 0.3 frame sides each, one per half of the clip."""
    radius = side * (0.09 if size == "small" else 0.17)
    offsets = _path(motion, then, frames, side * (0.3 if then else 0.45))
    margin = radius + 2
    # start so that the whole path stays inside the frame
    low = margin - offsets.min(axis=0)
    high = side - margin - offsets.max(axis=0)
    start_x, start_y = rng.uniform(low[0], high[0]), rng.uniform(low[1], high[1])
    centre_x = (start_x + offsets[:, 0])[:, None, None]
    centre_y = (start_y + offsets[:, 1])[:, None, None]
    grid_y, grid_x = np.mgrid[0:side, 0:side].astype(np.float32)
    off_x, off_y = grid_x[None] - centre_x, grid_y[None] - centre_y
    if shape == "circle":
        inside = off_x ** 2 + off_y ** 2 <= radius ** 2
    elif shape == "square":
        inside = np.maximum(np.abs(off_x), np.abs(off_y)) <= radius * 0.85
    else:  # triangle pointing up
        inside = (off_y <= radius * 0.8) & (np.abs(off_x) <= (off_y + radius) * 0.6) & (off_y >= -radius)
    background = rng.integers(10, 70, size=3)
    clip = np.empty((frames, side, side, 3), dtype=np.float32)
    clip[:] = background
    clip += rng.normal(0.0, 6.0, size=(1, side, side, 3)).astype(np.float32)  # fixed texture
    clip[inside] = np.array(COLORS[color], dtype=np.float32)
    return np.clip(clip, 0, 255).astype(np.uint8)


def encode_mp4(clip: np.ndarray, path: Path, fps: int = 8) -> None:
    frames, height, width, _ = clip.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"preset": "ultrafast", "crf": "16",
                                                                     "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _render_job(job: tuple) -> str:
    item, frames, side, seed, index, folder = job
    rng = np.random.default_rng([seed, index])
    clip = render_clip(item.color, item.shape, item.size, item.motion, frames, side, rng, item.then)
    encode_mp4(clip, Path(folder) / f"{item.video}.mp4")
    return item.video


def _image_job(job: tuple) -> str:
    item, side, seed, index, folder = job
    rng = np.random.default_rng([seed, 1_000_000 + index])
    image = render_clip(item.color, item.shape, item.size, "still", 1, side, rng)[0]
    Image.fromarray(image).save(Path(folder) / f"{item.video}.png")
    return item.video


# ---------------------------------------------------------------- text

def describe(item: DemoVideo, variant: int = 0) -> str:
    noun = f"{item.size} {item.color} {item.shape}"
    if item.then:
        first, second = item.motion, item.then
        templates = (f"a {noun} moves {first} then {second}", f"the {noun} is moving {first} and then {second}",
                     f"a {noun} first slides {first} then {second}")
        return templates[variant % len(templates)]
    if item.motion == "still":
        templates = (f"a {noun} stays still", f"the {noun} does not move", f"a {noun} rests in place")
    else:
        templates = (f"a {noun} moves {item.motion}", f"the {noun} is moving {item.motion}",
                     f"a {noun} slides {item.motion}")
    return templates[variant % len(templates)]


def describe_motion(item: DemoVideo, variant: int = 0) -> str:
    """A caption of the motion alone (no colour, shape or size): only the clip's motion can match it."""
    if item.then:
        return (f"something moves {item.motion} then {item.then}",
                f"an object moving {item.motion} and then {item.then}")[variant % 2]
    if item.motion == "still":
        return ("something stays still", "an object staying still")[variant % 2]
    return (f"something moves {item.motion}", f"an object moving {item.motion}")[variant % 2]


def describe_image(item: DemoVideo, variant: int = 0) -> str:
    noun = f"{item.size} {item.color} {item.shape}"
    return (f"a {noun}", f"a picture of a {noun}", f"an image showing a {noun}")[variant % 3]


def _split_of(index: int, count: int) -> str:
    fraction = index / count
    return "train" if fraction < 0.7 else ("val" if fraction < 0.85 else "test")


def make_items(count: int, seed: int, prefix: str) -> list[DemoVideo]:
    rng = np.random.default_rng(seed)
    items = []
    order = rng.permutation(count)
    for index in range(count):
        items.append(DemoVideo(
            video=f"{prefix}{index:04d}", color=str(rng.choice(list(COLORS))), shape=str(rng.choice(SHAPES)),
            size=str(rng.choice(SIZES)), motion=MOTIONS[index % len(MOTIONS)],
            split=_split_of(int(order[index]), count)))
    return items


def make_sequences(count: int, seed: int, prefix: str = "seq") -> list[DemoVideo]:
    """`count` two-move videos (train split), the 12 ordered pairs of distinct moves in turn."""
    rng = np.random.default_rng([seed, 11])
    pairs = [(a, b) for a in MOTIONS[:4] for b in MOTIONS[:4] if a != b]
    return [DemoVideo(video=f"{prefix}{index:04d}", color=str(rng.choice(list(COLORS))), shape=str(rng.choice(SHAPES)),
                      size=str(rng.choice(SIZES)), motion=pairs[index % len(pairs)][0], split="train",
                      then=pairs[index % len(pairs)][1])
            for index in range(count)]


def build_annotations(videos: list[DemoVideo], images: list[DemoVideo], seed: int,
                      motion_captions: int = 0, sequences: Sequence[DemoVideo] = ()) -> dict[str, dict]:
    """Every annotation file of the demo as {file name: JSON object}.

    `motion_captions` adds that many motion-only captions per video to `txt_pretrain.json`; `sequences`
    (two-move videos) appear in `txt_pretrain.json` only, so every downstream file is the same with or without.
    """
    rng = np.random.default_rng([seed, 7])
    splits = ("train", "val", "test")
    by_split = {s: [v for v in videos if v.split == s] for s in splits}
    captioned = {s: by_split[s] + [v for v in sequences if v.split == s] for s in splits}
    files: dict[str, dict] = {}
    files["txt_pretrain.json"] = {s: {v.video: [describe(v, 0), describe(v, 1), describe(v, 2)]
                                          + [describe_motion(v, k) for k in range(motion_captions)] for v in captioned[s]}
                                  for s in ("train", "val")}
    image_split = {s: [i for i in images if i.split == s] for s in splits}
    files["txt_image.json"] = {s: {i.video: [describe_image(i, 0), describe_image(i, 1)] for i in image_split[s]}
                               for s in ("train", "val")}
    files["txt_retrieval.json"] = {
        s: [{"video": v.video, "caption": describe(v, k)} for v in by_split[s] for k in ((0, 1) if s == "train" else (0,))]
        for s in splits}
    files["txt_caption.json"] = {s: [{"video": v.video, "caption": [describe(v, 0), describe(v, 1)]} for v in by_split[s]]
                                 for s in splits}
    # TGIF-style multiple choice: the answer needs the motion
    qamc = {}
    for s in splits:
        records = []
        for v in by_split[s]:
            options = [MOTION_PHRASES[m] for m in rng.permutation(MOTIONS)]
            record = {"question": f"what does the {v.size} {v.color} {v.shape} do ?"}
            record.update({f"option_{k}": o for k, o in enumerate(options)})
            record.update({"answer": options.index(MOTION_PHRASES[v.motion]), "video": v.video})
            records.append(record)
        qamc[s] = records
    files["txt_qamc.json"] = qamc
    # MSRVTT-MC style: the true caption among four captions that change one attribute
    capmc = {}
    for s in splits:
        records = []
        for v in by_split[s]:
            distractors: list[str] = []
            attributes = ["motion", "color", "shape", "motion"]
            for attribute in attributes:
                for _ in range(20):
                    changed = DemoVideo(**asdict(v))
                    pool = {"motion": MOTIONS, "color": list(COLORS), "shape": SHAPES}[attribute]
                    setattr(changed, attribute, str(rng.choice([p for p in pool if p != getattr(v, attribute)])))
                    text = describe(changed, 0)
                    if text not in distractors:
                        distractors.append(text)
                        break
            options = distractors[:4] + [describe(v, 0)]
            order = rng.permutation(len(options))
            options = [options[k] for k in order]
            record = {f"option_{k}": o for k, o in enumerate(options)}
            record.update({"answer": options.index(describe(v, 0)), "video": v.video})
            records.append(record)
        capmc[s] = records
    files["txt_capmc.json"] = capmc
    # open-ended QA over one vocabulary; motion answers need several frames
    vocab = list(COLORS) + list(SHAPES) + list(SIZES) + list(MOTIONS)
    answer = {word: k for k, word in enumerate(vocab)}
    qaoe: dict = {}
    for s in splits:
        records = []
        for number, v in enumerate(by_split[s]):
            records.append({"video": v.video, "question": f"what color is the {v.shape} ?", "answer": answer[v.color]})
            records.append({"video": v.video, "question": f"what shape is the {v.color} object ?", "answer": answer[v.shape]})
            records.append({"video": v.video, "question": f"is the {v.color} {v.shape} big or small ?", "answer": answer[v.size]})
            records.append({"video": v.video, "question": f"which way does the {v.color} {v.shape} move ?",
                            "answer": answer[v.motion]})
            if s == "test" and number % 5 == 0:
                # an answer outside the vocabulary: counted wrong at evaluation, like the benchmarks
                records.append({"video": v.video, "question": f"how old is the {v.shape} ?", "answer": -1})
        qaoe[s] = records
    qaoe["vocab"] = vocab
    files["txt_qaoe.json"] = qaoe
    fib_vocab = list(COLORS) + list(MOTIONS[:4])
    fib_answer = {word: k for k, word in enumerate(fib_vocab)}
    fib: dict = {}
    for s in splits:
        records = []
        for v in by_split[s]:
            records.append({"video": v.video, "question": f"a {v.size} _____ {v.shape} is in the video .",
                            "answer": fib_answer[v.color]})
            if v.motion != "still":
                records.append({"video": v.video, "question": f"the {v.size} {v.color} {v.shape} moves _____ .",
                                "answer": fib_answer[v.motion]})
        fib[s] = records
    fib["vocab"] = fib_vocab
    files["txt_fib.json"] = fib
    files["txt_action.json"] = {s: [{"video": v.video, "label": MOTIONS.index(v.motion)} for v in by_split[s]]
                                for s in splits}
    files["txt_action.json"]["labels"] = ACTION_LABELS
    return files


def all_texts(files: dict[str, dict]) -> list[str]:
    # LAVENDER answers VTM with the words "true" / "false": weight them so they become whole word pieces
    texts: list[str] = ["is this video matched with the text ? true", "it is false"] * 50

    def walk(node) -> None:
        if isinstance(node, str):
            texts.append(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key != "video":  # ids are not language
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for content in files.values():
        walk(content)
    return texts


def train_tokenizer(texts: list[str], folder: Path, vocab_size: int = 384) -> None:
    """WordPiece vocabulary from the demo's text, saved as a BERT-style tokenizer directory.

    Words are split by the `tokenizers` BERT normaliser and pre-tokeniser; the vocabulary is the
    special tokens, every character (plain and `##` continuation, so no word is ever [UNK]) and then
    whole words by frequency. `tokenizers`' own WordPieceTrainer breaks frequency ties differently
    from run to run, which would make the demo depend on luck; counting here keeps it a function of
    the seed.
    """
    normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    characters = sorted({ch for word in counts for ch in word})
    tokens = list(SPECIAL_TOKENS) + characters + ["##" + ch for ch in characters]
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(tokens)} special and character tokens")
    known = set(tokens)
    for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(tokens) >= vocab_size:
            break
        if word not in known:
            tokens.append(word)
            known.add(word)
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab=vocab, unk_token="[UNK]",
                                                                 max_input_chars_per_word=100))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer.decoder = tokenizers.decoders.WordPiece(prefix="##")
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in tokens))
    special = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
               "mask_token": "[MASK]"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512,
         "strip_accents": None, "tokenize_chinese_chars": True}, indent=1))


# ---------------------------------------------------------------- building the demo

@dataclass
class DemoSummary:
    """What `make_demo_data` built: its folder, the contents of its `demo.json`, the annotation files written."""

    root: Path
    meta: dict
    annotation_files: int
    seconds: float


def make_demo_data(out: str = "data/demo", num_videos: int = 300, num_images: int = 100, num_frames: int = 8,
                   render_frames: int = 16, size: int = 64, seed: int = 0, workers: int = 2,
                   vocab_size: int = 384, motion_captions: int = 0, num_sequences: int = 0,
                   force: bool = False) -> DemoSummary:
    """Generate the synthetic demo dataset in `out` (`violet-ds make-demo-data` documents the arguments); an
    existing, non-empty `out` is refused (FileExistsError) unless `force`, which deletes it first."""
    started = time.perf_counter()
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        if not force:
            raise FileExistsError(f"{root} exists and is not empty; pass --force true to rebuild it")
        shutil.rmtree(root)
    side = size + (size % 2)
    (root / "videos").mkdir(parents=True)
    (root / "images").mkdir(parents=True)
    videos = make_items(num_videos, seed, "demo")
    images = make_items(num_images, seed + 1, "img")
    for image in images:
        image.motion = "still"
    sequences = make_sequences(num_sequences, seed)
    render_jobs = [(v, render_frames, side, seed, i, str(root / "videos")) for i, v in enumerate(videos)]
    render_jobs += [(v, render_frames, side, seed, 2_000_000 + i, str(root / "videos")) for i, v in enumerate(sequences)]
    image_jobs = [(v, side, seed, i, str(root / "images")) for i, v in enumerate(images)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_render_job, render_jobs, chunksize=8)
            pool.map(_image_job, image_jobs, chunksize=8)
    else:
        list(map(_render_job, render_jobs))
        list(map(_image_job, image_jobs))
    video_report = run_extraction(list_inputs(str(root / "videos"), {".mp4"}), root, "video",
                                  ExtractOptions(num_frames=num_frames, short_side=side), shard_size=128,
                                  workers=workers, progress=False)
    image_report = run_extraction(list_inputs(str(root / "images"), {".png"}), root, "image",
                                  ExtractOptions(short_side=side, images=True), shard_size=10_000,
                                  workers=workers, progress=False)
    failed = {**video_report.failed, **image_report.failed}
    if failed:
        raise RuntimeError(f"demo extraction failed for {sorted(failed)[:5]}: {next(iter(failed.values()))}")
    files = build_annotations(videos, images, seed, motion_captions, sequences)
    for name, content in files.items():
        (root / name).write_text(json.dumps(content, indent=1))
    train_tokenizer(all_texts(files), root / "tokenizer", vocab_size)
    words = len((root / "tokenizer" / "vocab.txt").read_text().split())
    (root / "tokenizer" / DEMO_MARKER).write_text(json.dumps(
        {"vocabulary": "the synthetic demo data of `violet-ds make-demo-data`", "word_pieces": words}, indent=1) + "\n")
    tokenizer = Tokenizer(root / "tokenizer")
    for vocab_name in ("txt_qaoe.json", "txt_fib.json"):
        for word in files[vocab_name]["vocab"] + ["true", "false"]:
            if tokenizer.token_id(word) < 0:
                raise RuntimeError(f"demo answer {word!r} is not a single word piece of the demo vocabulary")
    meta = {"arguments": {"num_videos": num_videos, "num_images": num_images, "num_frames": num_frames,
                          "render_frames": render_frames, "size": side, "seed": seed, "vocab_size": vocab_size,
                          "motion_captions": motion_captions, "num_sequences": num_sequences},
            "videos": {s: sum(v.split == s for v in videos) for s in ("train", "val", "test")},
            "sequences": {"train": len(sequences)},
            "video_shards": [Path(p).name for p in video_report.shards],
            "image_shards": [Path(p).name for p in image_report.shards],
            "tokenizer_vocab_size": tokenizer.vocab_size, "motions": list(MOTIONS), "colors": list(COLORS),
            "shapes": list(SHAPES), "sizes": list(SIZES)}
    (root / "demo.json").write_text(json.dumps(meta, indent=1))
    return DemoSummary(root, meta, len(files), time.perf_counter() - started)
