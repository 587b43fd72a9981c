"""The training engine takes MVM targets from `data.*.targets` sidecars (`violet-ds extract-targets`).

A real pixel sidecar of the demo videos is extracted, then overwritten with a constant far from any
normalised pixel: a run that used the live teacher would report an ordinary MVM loss, a run that
used the sidecar reports the distance to that constant.
"""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from engine_support import run_cli, tiny_config, train_records, write_config
from violet_ds.commands.targets import extract_targets
from violet_ds.config import DataConfig, DataSource
from violet_ds.data.sidecars import TargetStore

torch.set_num_threads(2)
FRAMES, SIZE = 2, 64
SIDECAR_VALUE = 40.0


@pytest.fixture(scope="module")
def pixel_sidecar(demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sidecars") / "pixel"
    assert extract_targets(str(demo / "video_000.tsv"), "pixel", str(out), num_frames=FRAMES, size=SIZE,
                           batch_size=16, store_dtype="float32") == 0
    return out


def _video_source(demo, **changes) -> DataSource:
    return DataSource(tsv=str(demo / "video_000.tsv"), annotations=str(demo / "txt_pretrain.json"), **changes)


def test_training_clips_read_like_extraction(demo, pixel_sidecar):
    """With a sidecar the training reader drops random offsets/crops/flips and equals the extraction clip."""
    from violet_ds.data.datasets import PretrainDataset
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.data.tsv import TSVFile
    from violet_ds.commands.run import prepare_sidecars
    from violet_ds.targets.extract import read_row_clip

    data = DataConfig(train=[_video_source(demo, targets=str(pixel_sidecar))], num_frames=FRAMES, image_size=SIZE)
    dataset = PretrainDataset(data.train[0].tsv, data.train[0].annotations, "train", Tokenizer(str(demo / "tokenizer")),
                              num_frames=FRAMES, size=SIZE, train=True, flip=True)
    assert dataset.reader.random_clip
    stores = prepare_sidecars({"train": dataset}, data, "train")
    assert list(stores) == ["pixel"] and not dataset.reader.random_clip and dataset.train
    table = TSVFile(data.train[0].tsv)
    row = table.keys().index(dataset.video_of(3))
    for _ in range(3):
        assert torch.equal(dataset[3]["video"], read_row_clip(table, row, FRAMES, SIZE))

    # a source read with another spatial mode cannot use the sidecar
    squashed = PretrainDataset(data.train[0].tsv, data.train[0].annotations, "train",
                               Tokenizer(str(demo / "tokenizer")), num_frames=FRAMES, size=SIZE, spatial="resize")
    with pytest.raises(ValueError, match="spatial='resize'"):
        prepare_sidecars({"train": squashed}, data, "train")
    # and the sidecar's geometry must be the run's
    with pytest.raises(ValueError, match="data.num_frames"):
        prepare_sidecars({"train": dataset}, DataConfig(train=data.train, num_frames=3, image_size=SIZE), "train")


def test_duplicate_target_is_refused(demo, pixel_sidecar, tmp_path):
    from violet_ds.commands.run import prepare_sidecars

    copy = tmp_path / "pixel_again"
    shutil.copytree(pixel_sidecar, copy)
    data = DataConfig(train=[_video_source(demo, targets=f"{pixel_sidecar}, {copy}")], num_frames=FRAMES,
                      image_size=SIZE)
    with pytest.raises(ValueError) as info:
        prepare_sidecars({}, data, "train")
    assert str(pixel_sidecar) in str(info.value) and str(copy) in str(info.value) and "'pixel'" in str(info.value)
    # the same holds across two sources of one split
    data.train = [_video_source(demo, targets=str(pixel_sidecar)), _video_source(demo, targets=str(copy))]
    with pytest.raises(ValueError, match="both hold target 'pixel'"):
        prepare_sidecars({}, data, "train")


def test_pretrain_consumes_the_sidecar(demo, pixel_sidecar, tmp_path):
    tampered = tmp_path / "pixel_constant"
    shutil.copytree(pixel_sidecar, tampered)
    store = TargetStore(tampered, mode="r+")
    assert store.num_done() == len(store) == 48
    store.values[:] = SIDECAR_VALUE
    store.values.flush()
    del store

    config = tiny_config(demo, tmp_path / "runs", "sidecar",
                         data__train=[{"tsv": str(demo / "video_000.tsv"), "annotations": str(demo / "txt_pretrain.json"),
                                       "split": "train", "targets": str(tampered)}])
    config["run"].update(max_steps=2, save_every=0)
    config["engine"]["precision"] = "fp32"
    run_cli(write_config(config, tmp_path / "sidecar.yaml"), timeout=240)
    run_dir = tmp_path / "runs" / "sidecar"
    records = train_records(run_dir)
    assert len(records) == 2, records
    for record in records:
        assert math.isfinite(record["loss"]), record
        # pixel targets of normalised frames lie within a few units; the sidecar's constant is 40
        assert record["loss_mvm"] > SIDECAR_VALUE / 2, record
    log = (run_dir / "log.txt").read_text()
    assert f"pixel <- {tampered}" in log and "48/48 rows" in log
    assert np.isfinite(records[-1]["loss"])
