"""`violet-ds extract-targets`: sidecar store of a target over the fixture TSV, resume, and reading it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from violet_ds.commands.targets import extract_targets
from violet_ds.data.sidecars import SidecarCollate, TargetStore, attach_targets, open_stores
from violet_ds.targets import TargetSpec, create_target, create_targets
from violet_ds.targets.extract import read_row_clip

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tsv_path(official_dir):
    return official_dir / "_tools" / "msrvtt.tsv"


def live(target_name: str, tsv_path, rows, **options):
    from violet_ds.data.frames import normalize
    from violet_ds.data.tsv import TSVFile

    table = TSVFile(tsv_path)
    video = normalize(torch.stack([read_row_clip(table, row, num_frames=2, size=64) for row in rows]))
    return create_target(target_name, **options).compute(video)


def test_extract_resume_and_read_back(tsv_path, tmp_path, capsys):
    out = tmp_path / "hog_store"
    args = dict(tsv=str(tsv_path), target="hog", output=str(out), options={"layout": "feature"}, num_frames=2,
                size=64, batch_size=2, limit=5, store_dtype="float32")
    assert extract_targets(**args) == 0
    store = TargetStore(out)
    assert len(store) == 5 and store.num_done() == 5
    assert store.spec == TargetSpec("feature", 144, "l1")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["geometry"]["num_frames"] == 2 and meta["options"] == {"layout": "feature"}
    # the stored rows equal the live target on the same clips
    expected = live("hog", tsv_path, [0, 3], layout="feature")
    got = store.get_batch([store.keys[0], store.keys[3]])
    assert torch.allclose(got.value, expected.value, atol=1e-6) and got.valid.all()

    # resume: nothing new; then a row whose done flag was never set (a killed run) is redone, alone
    assert extract_targets(**args) == 0
    assert "0 new clips, 5 already done" in capsys.readouterr().out
    writable = TargetStore(out, mode="r+")
    writable.values[1] = 0
    writable.done[1] = False
    writable.values.flush(), writable.done.flush()
    del writable
    assert extract_targets(**args) == 0
    assert "1 new clips, 4 already done" in capsys.readouterr().out
    assert torch.allclose(TargetStore(out).get(store.keys[1]).value, live("hog", tsv_path, [1], layout="feature").value[0],
                          atol=1e-6)

    # other settings never silently overwrite
    with pytest.raises(ValueError, match="other settings"):
        extract_targets(**dict(args, options={"layout": "dense"}))
    assert extract_targets(**dict(args, options={"layout": "dense"}, overwrite=True)) == 0
    assert TargetStore(out).spec == TargetSpec("dense", 9, "l1")


def test_token_store_and_sidecar_batches(tsv_path, tmp_path):
    from violet_ds.data.datasets import collate
    from violet_ds.targets.vq import DalleEncoder

    torch.manual_seed(0)
    torch.save(DalleEncoder(n_hid=8, blocks_per_group=1, vocab_size=64).state_dict(), tmp_path / "dalle.pt")
    options = {"checkpoint": str(tmp_path / "dalle.pt")}
    out = tmp_path / "vq_store"
    assert extract_targets(str(tsv_path), "vq", str(out), options=options, num_frames=2, size=64, limit=3) == 0
    store = TargetStore(out)
    assert store.values.dtype == np.int16 and store.values.shape == (3, 2, 2, 2)
    with pytest.raises(ValueError, match="geometry"):
        open_stores({"vq": out}, num_frames=4, size=64)
    stores = open_stores({"vq": out}, num_frames=2, size=64)

    # a batch whose videos are all in the store carries the target; the mix then skips the teacher
    samples = [{"video_id": key, "index": i} for i, key in enumerate(store.keys[:2])]
    batch = SidecarCollate(collate, stores)(samples)
    assert batch["mvm_target:vq"].dtype == torch.long
    assert torch.equal(batch["mvm_target:vq"], live("vq", tsv_path, [0, 1], **options).value)
    mix = create_targets({"vq": 1.0})  # no checkpoint: would raise if it had to run a teacher
    assert torch.equal(mix.compute(torch.zeros(2, 2, 3, 64, 64), batch)["vq"].value, batch["mvm_target:vq"])
    # one video missing from the store: nothing attached, the live teacher is used for that batch
    partial = attach_targets({"video_id": [store.keys[0], "not-extracted"]}, stores)
    assert "mvm_target:vq" not in partial
