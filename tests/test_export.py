"""`violet-ds export`: a ZeRO-2 checkpoint -> fp32 safetensors that create_model and init_from load."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch
from safetensors.torch import load_file, safe_open

from engine_support import run_cli, tiny_config, write_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, demo):
    root = tmp_path_factory.mktemp("export")
    config = write_config(tiny_config(demo, root, "exp", run__max_steps=2, run__save_every=0,
                                      run__log_sample_indices=False), root / "run.yaml")
    run_cli(config)
    return root / "exp"


def test_export_then_create_model_and_init_from(trained_run, tmp_path, demo):
    from violet_ds.cli import main
    from violet_ds.config import TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.engine.export import deepspeed_fp32_state_dict
    from violet_ds.commands.run import load_init_weights
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    out = tmp_path / "weights.safetensors"
    main(["export", "--checkpoint", str(trained_run), "--output", str(out)])
    state = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert any(k.startswith("heads.mvm.") for k in state) and any(k.startswith("model.video_backbone.") for k in state)
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["model_name"] == "violet-tiny"
    # the fp32 master weights, not the bf16 copies: equal to zero_to_fp32's consolidation
    master = deepspeed_fp32_state_dict(trained_run)
    assert all(torch.equal(state[k], master[k]) for k in master)

    model = create_model("violet-tiny", weights=str(out), vocab_size=384, max_frames=4)
    backbone = model.state_dict()
    assert all(torch.equal(backbone[k], state["model." + k]) for k in backbone)
    # and it differs from a fresh initialisation (training happened)
    fresh = create_model("violet-tiny", vocab_size=384, max_frames=4).state_dict()
    assert any(not torch.equal(fresh[k], backbone[k]) for k in backbone if fresh[k].is_floating_point())

    tokenizer = Tokenizer(demo / "tokenizer")
    task = create_task("pretrain", create_model("violet-tiny", vocab_size=384, max_frames=4), TaskConfig(), tokenizer)
    report = load_init_weights(task, str(out))
    assert report.initialised == [] and report.unexpected == [] and report.mismatched == {}
    assert torch.equal(task.state_dict()["heads.mvm.proj.weight"], state["heads.mvm.proj.weight"])
    # a run directory is accepted directly as init_from
    report = load_init_weights(task, str(trained_run))
    assert report.initialised == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_export_writes_with_the_umask_and_keeps_library_output_off_the_console(trained_run, tmp_path, umask, mode,
                                                                                capfd):
    """Both export formats: files get the umask's mode (safetensors alone would make them 0600); zero_to_fp32's
    prints stay off stdout and its progress bar is a dated line when stderr is not a terminal."""
    from violet_ds.cli import main

    capfd.readouterr()
    previous = os.umask(umask)
    try:
        main(["export", "--checkpoint", str(trained_run), "--format", "dir", "--output", str(tmp_path / "model")])
        main(["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / "w.safetensors")])
    finally:
        os.umask(previous)
    written = [path for path in (tmp_path / "model").iterdir()] + [tmp_path / "w.safetensors", tmp_path / "w.json"]
    assert (tmp_path / "model" / "model.safetensors") in written
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {
        path.name: oct(mode) for path in written}
    out, err = capfd.readouterr()
    assert out.startswith("exported ") and "Processing zero checkpoint" not in out + err
    assert all(line.startswith(("exported ", "  ")) for line in out.splitlines()), out
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2 and all(
        re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d Loading checkpoint shards: 1/1 it \(100%\)", line) for line in lines)
