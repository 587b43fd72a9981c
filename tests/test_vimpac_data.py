"""VIMPAC data: VQ token rows, extract-vq through a (random, official-layout) dVAE encoder, extract-targets
sidecars as token stores, clip sampling with [PAD], evaluation views, the tasks' dataset hooks, configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from violet_ds.commands.targets import extract_vq
from violet_ds.config import DataConfig, DataSource, TaskConfig
from violet_ds.data.datasets import collate
from violet_ds.data.frames import encode_b64_jpeg
from violet_ds.data.tsv import TSVWriter
from violet_ds.data.vq_clips import (
    VQActionDataset,
    VQPretrainDataset,
    VQTokenError,
    VQTokenStore,
    decode_token_row,
    encode_token_row,
    write_vq_tsv,
)
from violet_ds.registry import MODELS
from violet_ds.targets.vq import write_random_dvae

torch.set_num_threads(2)

PAD = 8193
TINY = dict(hidden_size=16, num_layers=1, num_heads=4, head_dim=4, mlp_size=24, frames=3, height=4, width=4)
REPO = Path(__file__).resolve().parents[1]


def _grid(n, h=4, w=4, start=0):
    return (np.arange(n * h * w).reshape(n, h, w) + start).astype(np.int64) % 8192


def test_token_row_round_trip_and_errors():
    tokens = _grid(3, 2, 5)
    columns = encode_token_row("v1", tokens)
    assert columns[1] == "3,2,5"
    key, back = decode_token_row(columns, "x.tsv row 0")
    assert key == "v1" and np.array_equal(back, tokens)
    with pytest.raises(VQTokenError, match="x.tsv row 4 .*truncated"):
        decode_token_row([columns[0], columns[1], columns[2][:-8]], "x.tsv row 4")
    with pytest.raises(VQTokenError, match="bad shape"):
        decode_token_row(["v", "a,b", columns[2]], "x.tsv row 1")
    with pytest.raises(VQTokenError, match="integer array"):
        encode_token_row("v", np.zeros((2, 2)))


def _frame_tsv(path: Path, videos: dict) -> None:
    with TSVWriter(path) as writer:
        for key, frames in videos.items():
            writer.write([key] + [encode_b64_jpeg(frame) for frame in frames])


def test_extract_vq_matches_the_encoder_and_keeps_video_lengths(tmp_path):
    from violet_ds.targets.vq import DalleEncoder
    from violet_ds.weights import read_state_dict

    rng = np.random.default_rng(0)
    videos = {"long": rng.integers(0, 255, (5, 40, 48, 3), dtype=np.uint8),
              "short": rng.integers(0, 255, (2, 40, 48, 3), dtype=np.uint8)}
    _frame_tsv(tmp_path / "frames.tsv", videos)
    encoder_path = write_random_dvae(tmp_path / "dvae.pt", n_hid=8, blocks_per_group=1, seed=3)
    state = read_state_dict(encoder_path)
    assert "blocks.input.w" in state and "blocks.output.conv.w" in state  # the official key layout
    assert extract_vq(str(tmp_path / "frames.tsv"), str(encoder_path), str(tmp_path / "vq.tsv"), size=32,
                      batch_frames=3) == 0
    store = VQTokenStore(tmp_path / "vq.tsv")
    assert set(store.keys()) == {"long", "short"}
    assert store["long"].shape == (5, 4, 4) and store["short"].shape == (2, 4, 4)

    # the same frames through the encoder by hand: short side to 32, centre crop, [eps, 1-eps] pixels
    from violet_ds.data.frames import VideoTransform, decode_frames, encode_jpeg

    encoder = DalleEncoder.from_state_dict(state).eval()
    frames = decode_frames([encode_jpeg(f) for f in videos["long"]])
    pixels = VideoTransform(32, train=False, mode="crop")(frames).float() / 255.0
    with torch.no_grad():
        expected = encoder(DalleEncoder.map_pixels(pixels)).argmax(1)
    assert np.array_equal(store["long"], expected.numpy())
    with pytest.raises(ValueError, match="multiple of 8"):
        extract_vq(str(tmp_path / "frames.tsv"), str(encoder_path), str(tmp_path / "bad.tsv"), size=30)


def test_extract_targets_sidecar_is_a_token_store(tmp_path):
    from violet_ds.data.sidecars import TargetOutput, TargetStore

    meta = {"target": "vq", "spec": {"kind": "token", "channels": 8192, "loss": "cross_entropy"}, "options": {},
            "geometry": {"num_frames": 3, "size": 32, "sampling": "segment-centre", "spatial": "crop"}}
    store = TargetStore.create(tmp_path / "side", meta, ["a", "b"], (3, 4, 4), "int16", 3)
    store.write([0], TargetOutput(torch.from_numpy(_grid(1 * 3).reshape(1, 3, 4, 4))))
    tokens = VQTokenStore(str(tmp_path / "side"))
    assert tokens.keys() == ["a"], "rows not extracted yet are not offered"
    assert np.array_equal(tokens["a"], _grid(3))
    meta["target"] = "depth"
    meta["spec"] = {"kind": "dense", "channels": 1, "loss": "l1"}
    TargetStore.create(tmp_path / "depth", meta, ["a"], (3, 1, 32, 32), "float16", 3)
    with pytest.raises(VQTokenError, match="needs the 'vq' token target"):
        VQTokenStore(str(tmp_path / "depth"))


@pytest.fixture()
def vq_files(tmp_path):
    videos = {f"v{i}": _grid(6 if i else 2, 6, 6, start=100 * i) for i in range(6)}  # v0 is short
    write_vq_tsv(tmp_path / "vq.tsv", videos.items())
    labels = {"train": [{"video": f"v{i}", "label": i % 3} for i in range(4)],
              "val": [{"video": f"v{i}", "label": i % 3} for i in range(4, 6)], "labels": ["a", "b", "c"]}
    (tmp_path / "action.json").write_text(json.dumps(labels))
    return tmp_path


def test_pretrain_clips_pad_short_videos_and_crop_the_grid(vq_files):
    data = VQPretrainDataset(vq_files / "vq.tsv", annotations=vq_files / "action.json", split="train",
                             clip_frames=3, grid=(4, 4), seed=1)
    assert len(data) == 4
    short = data[0]  # 2 stored frames, 3 wanted: the last frame is [PAD]
    assert short["vq_tokens"].shape == (3, 4, 4) and short["vq_tokens_b"].shape == (3, 4, 4)
    assert (short["vq_tokens"][2] == PAD).all() and (short["vq_tokens"][:2] != PAD).all()
    stored = data.store["v1"]
    sample = data[1]
    # every clip is a crop of consecutive stored frames
    for clip in (sample["vq_tokens"], sample["vq_tokens_b"]):
        clip = clip.numpy()
        found = [(s, t, l) for s in range(4) for t in range(3) for l in range(3)
                 if np.array_equal(stored[s:s + 3, t:t + 4, l:l + 4], clip)]
        assert found, "clip is not a window of the stored tokens"
    assert torch.equal(data[1]["vq_tokens"], sample["vq_tokens"]), "seeded datasets repeat their clips"
    with pytest.raises(KeyError, match="no VQ tokens"):
        VQPretrainDataset(vq_files / "vq.tsv", video_ids=["v1", "missing"])
    with pytest.raises(VQTokenError, match="smaller than the model grid"):
        VQPretrainDataset(vq_files / "vq.tsv", video_ids=["v1"], grid=(8, 8))[0]


def test_action_views_are_evenly_spaced_clips_and_crops(vq_files):
    data = VQActionDataset(vq_files / "vq.tsv", vq_files / "action.json", split="val", clip_frames=2,
                           grid=(6, 4), train=False, eval_clips=3, eval_crops=3)
    sample = data[0]
    views = sample["vq_views"]
    assert views.shape == (9, 2, 6, 4) and sample["label"] == 1 and data.num_classes == 3
    stored = torch.from_numpy(np.array(data.store["v4"]))
    # starts 0, 2, 4 of 6 frames (span 2); crops along the width at 0, 1, 2
    assert torch.equal(views[0], stored[0:2, :, 0:4]) and torch.equal(views[8], stored[4:6, :, 2:6])
    assert torch.equal(views[4], stored[2:4, :, 1:5])


def test_task_dataset_hooks_feed_the_tasks(vq_files):
    from violet_ds.tasks.vimpac import VimpacActionTask, VimpacPretrainTask

    def source(split):
        return DataSource(tsv="frames_not_read.tsv", vq=str(vq_files / "vq.tsv"),
                          annotations=str(vq_files / "action.json"), split=split)

    data = DataConfig(train=[source("train")], val=[source("val")], num_frames=3, eval_clips=2)
    model = MODELS.create("vimpac-small", **TINY)
    pretrain = VimpacPretrainTask(model, TaskConfig(name="vimpac_pretrain", options={
        "grid": [4, 4], "contrastive_hidden": 32, "contrastive_out": 8, "num_blocks": 2}))
    train_set = pretrain.build_datasets(data, None, "train")["train"]
    batch = collate([train_set[i] for i in range(4)])
    assert batch["vq_tokens"].shape == (4, 3, 4, 4)
    assert torch.isfinite(pretrain(batch)["loss"])

    action = VimpacActionTask(model, TaskConfig(name="vimpac_action", num_classes=3, options={
        "grid": [4, 4], "eval_crops": 2, "head_norm": "batch"}))
    val = action.build_datasets(data, None, "val")["val"]
    batch = collate([val[i] for i in range(2)])
    assert batch["vq_views"].shape == (2, 4, 3, 4, 4)
    action.eval()
    step = action.evaluate_step(batch)
    assert step["pred"].shape == (2,)
    with pytest.raises(ValueError, match="task.num_classes is 2"):
        VimpacActionTask(model, TaskConfig(name="vimpac_action", num_classes=2)).build_datasets(data, None, "train")


def test_launch_configs_name_known_options():
    import yaml

    from violet_ds.tasks.common import parse_options
    from violet_ds.tasks.vimpac import ACTION_OPTIONS, PRETRAIN_OPTIONS

    paths = sorted((REPO / "launch" / "configs").glob("vimpac_*.yaml"))
    names = {p.stem for p in paths}
    for required in ("vimpac_pretrain_small", "vimpac_pretrain_large", "vimpac_ssv2", "vimpac_diving48",
                     "vimpac_ucf101", "vimpac_hmdb51", "vimpac_k400"):
        assert required in names
    for path in paths:
        config = yaml.safe_load(path.read_text())
        task = config["task"]
        table = PRETRAIN_OPTIONS if task["name"] == "vimpac_pretrain" else ACTION_OPTIONS
        parse_options(task["name"], task.get("options") or {}, table)
        assert config["model"]["name"] in MODELS, path
        if task["name"] == "vimpac_action":
            assert task["num_classes"] >= 5
