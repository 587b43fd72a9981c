"""`violet_ds.weights`: the one path from a weight file into a module."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from violet_ds.errors import is_user_error
from violet_ds.weights import (WeightsMismatchError, compare_keys, current_umask, load_strict, read_state_dict,
                               safe_torch_load, save_safetensors, strip_prefix)


def _module() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))


def test_safetensors_and_torch_files_read_the_same(tmp_path):
    state = _module().state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        read = read_state_dict(tmp_path / name)
        assert set(read) == set(state) and all(torch.equal(read[k], state[k]) for k in state), name
    # a model directory reads as its weight file
    model_dir = tmp_path / "model_dir"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"format": "violet_ds-model-dir"}))
    (tmp_path / "w.safetensors").rename(model_dir / "model.safetensors")
    assert set(read_state_dict(model_dir)) == set(state)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        read_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s, "meta": {"epoch": 3}},  # mmcv / Video Swin Kinetics
    lambda s: {"model": s, "optimizer": {"lr": 1e-4}, "epoch": 7},  # Swin / VIOLET training scripts
    lambda s: {"module": {"module." + k: v for k, v in s.items()}},  # DeepSpeed / DDP
    lambda s: {"model": {"module": s}},
])
def test_nested_checkpoints_are_unwrapped(tmp_path, wrap):
    state = _module().state_dict()
    torch.save(wrap(state), tmp_path / "nested.pth")
    read = read_state_dict(tmp_path / "nested.pth")
    assert sorted(read) == sorted(state)
    module = _module()
    load_strict(module, read)


def test_a_dict_without_weights_is_refused(tmp_path):
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "notes.pt")
    with pytest.raises(ValueError, match="notes.pt: not a state dict"):
        read_state_dict(tmp_path / "notes.pt")


class _Payload:
    """Unpickling this would call `Path.touch` on a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "payload.pt"
    torch.save({"weight": torch.zeros(2), "hook": _Payload(str(marker))}, path)
    with pytest.raises(ValueError, match=r"payload.pt: not a weights-only torch checkpoint .*pathlib"):
        read_state_dict(path)
    with pytest.raises(pickle.UnpicklingError):
        safe_torch_load(path)
    assert not marker.exists()
    # a whole pickled module is refused the same way
    torch.save(_module(), tmp_path / "module.pt")
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt"):
        read_state_dict(tmp_path / "junk.pt")


def test_strict_load_names_missing_unexpected_and_mis_shaped_keys():
    module = _module()
    state = dict(module.state_dict())
    state.pop("1.bias")
    state["2.weight"] = torch.zeros(4)
    state["0.weight"] = torch.zeros(5, 3)
    report = compare_keys(state, module.state_dict())
    assert report.missing == ["1.bias"] and report.unexpected == ["2.weight"]
    assert report.mismatched == {"0.weight": ((5, 3), (4, 3))}
    before = module[0].weight.detach().clone()
    with pytest.raises(KeyError) as info:
        load_strict(module, state, source="ckpt.pt")
    message = str(info.value)
    for expected in ("ckpt.pt", "missing keys ['1.bias']", "unexpected keys ['2.weight']",
                     "0.weight: file (5, 3) vs module (4, 3)"):
        assert expected in message, message
    assert isinstance(info.value, WeightsMismatchError) and is_user_error(info.value)
    assert torch.equal(module[0].weight, before), "nothing is loaded when a key does not fit"


def test_strict_load_ignores_prefixes_and_strips_them():
    module = _module()
    source = _module()
    with torch.no_grad():
        source[0].weight.add_(1.0)
    state = {"backbone." + k: v for k, v in source.state_dict().items()}
    state["head.weight"] = torch.zeros(10, 4)
    load_strict(module, strip_prefix(state, "backbone."))
    assert torch.equal(module[0].weight, source[0].weight)
    with pytest.raises(KeyError, match="head.weight"):
        load_strict(module, state)
    load_strict(module, {**source.state_dict(), "head.weight": torch.zeros(1)}, ignore=("head.",))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)],
                         ids=["umask022", "umask027", "umask077"])
def test_save_safetensors_follows_the_umask(tmp_path, umask, mode):
    """safetensors creates its files 0600; ours get what any new file gets under the user's umask."""
    state = _module().state_dict()
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        path = save_safetensors(state, tmp_path / "w.safetensors", metadata={"format": "violet_ds"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]   # no .tmp left behind
    read = read_state_dict(path)
    assert all(torch.equal(read[k], state[k]) for k in state)
