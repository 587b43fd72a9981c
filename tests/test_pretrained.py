"""Model directories (save_pretrained / from_pretrained / export --format dir) and LAVENDER's task token."""

from __future__ import annotations

import json

import pytest
import torch


TINY = {"vocab_size": 384, "max_frames": 4}


def _task(demo, name="pretrain", seed=0, **cfg):
    from violet_ds.config import ModelConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    torch.manual_seed(seed)
    tokenizer = Tokenizer(demo / "tokenizer")
    model = build_model(ModelConfig(name="violet-tiny", overrides=dict(TINY)))
    task = create_task(name, model, TaskConfig(name=name, **cfg), tokenizer)
    # zero-initialised score/answer layers would make every output equal: give them values
    with torch.no_grad():
        for param in task.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return task.eval()


def _clip(batch=2, frames=2, size=64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, generator=generator)


def test_save_then_from_pretrained_is_exact(demo, tmp_path):
    import violet_ds

    task = _task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0})
    out = violet_ds.save_pretrained(task, tmp_path / "m", clip={"num_frames": 2, "image_size": 64, "max_text_len": 16})
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    loaded = violet_ds.from_pretrained(out)
    assert type(loaded) is type(task) and loaded.clip == {"num_frames": 2, "image_size": 64, "max_text_len": 16}
    ours, theirs = task.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    ids, mask = task.tokenizer.encode(["a red circle moves left", "a blue square"], 16)
    video = _clip()
    assert torch.equal(task.match_probability(video, ids, mask), loaded.match_probability(video, ids, mask))
    assert loaded.tokenizer.vocab_size == task.tokenizer.vocab_size
    card = (out / "README.md").read_text()
    assert "violet-tiny" in card and "pretrain" in card


def test_round_trip_mlm_task_with_inline_vocab_and_task_token(demo, tmp_path):
    from violet_ds.pretrained import from_pretrained, save_pretrained

    task = _task(demo, "qa_oe", head_style="mlm", task_token=True,
                 options={"answer_vocab": str(demo / "txt_qaoe.json")})
    out = save_pretrained(task, tmp_path / "qa", clip={"num_frames": 2, "image_size": 64, "max_text_len": 16})
    config = json.loads((out / "config.json").read_text())
    # the answer words travel with the directory, not the path of the machine that trained it
    assert config["task"]["options"]["answer_vocab"] == task.vocab and config["task"]["task_token"] is True
    loaded = from_pretrained(out)
    ids, mask = task.tokenizer.encode(["what colour is the shape", "where does it move"], 16)
    batch = {"video": _clip(), "text_ids": ids, "text_mask": mask}
    assert torch.equal(task.answer_logits(batch), loaded.answer_logits(batch))


def test_model_dir_as_init_from_and_model_weights(demo, tmp_path):
    from violet_ds.commands.run import load_init_weights
    from violet_ds.models import create_model
    from violet_ds.pretrained import save_pretrained

    task = _task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0})
    out = save_pretrained(task, tmp_path / "m", clip={"num_frames": 2})
    fresh = _task(demo, seed=5, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0})
    report = load_init_weights(fresh, str(out))
    assert report.initialised == [] and report.unexpected == [] and report.mismatched == {}
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in task.state_dict().items())
    backbone = create_model("violet-tiny", weights=str(out), **TINY)
    assert torch.equal(backbone.video_cls, task.model.video_cls)


def test_save_pretrained_refuses_mismatched_weights(demo, tmp_path):
    from violet_ds.pretrained import save_pretrained

    task = _task(demo, loss_weights={"vtm": 1.0, "mlm": 0.0, "mvm": 0.0})
    state = dict(task.state_dict())
    state.pop(next(iter(state)))
    with pytest.raises(KeyError, match="missing"):
        save_pretrained(task, tmp_path / "bad", state_dict=state)
    assert not (tmp_path / "bad" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------ task token
def test_task_token_off_is_frozen_and_changes_nothing(demo):
    from violet_ds.tasks.common import encode_video, fuse_pairs

    task = _task(demo, "qa_mc", head_style="mlm")
    assert not task.heads["task_embedding"].weight.requires_grad and task.task_vector() is None
    video_tokens, video_mask = encode_video(task.model, _clip(1))
    ids, mask = task.tokenizer.encode(["a red circle"], 16)
    plain = task.model.fuse(video_tokens, video_mask, task.model.embed_text(ids), mask)
    assert torch.equal(fuse_pairs(task.model, video_tokens, video_mask, ids, mask), plain)


@pytest.mark.parametrize("name,row", [("qa_mc", 1), ("retrieval", 0)])
def test_task_token_on_trains_only_its_row(demo, name, row):
    from violet_ds.data.tokenizer import Tokenizer

    task = _task(demo, name, head_style="mlm", task_token=True).train()
    tokenizer = Tokenizer(demo / "tokenizer")
    if name == "qa_mc":
        ids, mask = tokenizer.encode(["red", "blue", "green"] * 2, 16)
        batch = {"video": _clip(), "option_ids": ids.view(2, 3, 16), "option_mask": mask.view(2, 3, 16),
                 "answer": torch.tensor([0, 2])}
    else:
        ids, mask = tokenizer.encode(["a red circle moves left", "a blue square stays still"], 16)
        batch = {"video": _clip(), "text_ids": ids, "text_mask": mask, "video_id": ["a", "b"]}
    task(batch)["loss"].backward()
    grad = task.heads["task_embedding"].weight.grad
    assert grad is not None and grad[row].abs().sum() > 0
    assert grad[torch.arange(grad.shape[0]) != row].abs().sum() == 0
    # and the token changes what the model computes
    task.eval()
    with torch.no_grad():
        before = task.match_scores(*_pairs(task, tokenizer))
        task.heads["task_embedding"].weight[row].add_(1.0)
        after = task.match_scores(*_pairs(task, tokenizer))
    assert not torch.allclose(before, after)


def _pairs(task, tokenizer):
    from violet_ds.tasks.common import encode_video

    video_tokens, video_mask = encode_video(task.model, _clip(1))
    ids, mask = tokenizer.encode(["a red circle moves left"], 16)
    return video_tokens, video_mask, ids, mask


def test_lavender_pretraining_uses_vtm_token(demo):
    task = _task(demo, head_style="mlm", task_token=True, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0}).train()
    ids, mask = task.tokenizer.encode(["a red circle moves left", "a blue square", "a big green triangle"], 16)
    task({"video": _clip(3), "text_ids": ids, "text_mask": mask})["loss"].backward()
    grad = task.heads["task_embedding"].weight.grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_lavender_checkpoint_task_embedding_is_loaded(demo, tmp_path):
    """A LAVENDER-layout checkpoint's `emb_task` lands in heads.task_embedding (nothing reported unused)."""
    from violet_ds.commands.run import load_init_weights
    from violet_ds.models.checkpoint_io import to_official_state_dict

    weights = {"vtm": 1.0, "mlm": 1.0, "mvm": 0.0}
    source = _task(demo, head_style="mlm", loss_weights=weights)
    official = to_official_state_dict(source.state_dict())
    assert tuple(official["emb_task"].shape) == (10, 128)
    torch.save(official, tmp_path / "lavender.pt")
    target = _task(demo, "qa_oe", seed=3, head_style="mlm", options={"answer_vocab": str(demo / "txt_qaoe.json")})
    report = load_init_weights(target, str(tmp_path / "lavender.pt"))
    assert report.unexpected == [] and report.initialised == []
    assert torch.equal(target.heads["task_embedding"].weight, source.heads["task_embedding"].weight)


def test_official_lavender_listing_loads_with_nothing_unused(state_dict_listings, bert_dir):
    """Every key of the official LAVENDER pretraining model has a place in our LAVENDER pretraining task."""
    from violet_ds.config import TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.models.checkpoint_io import convert_official_state_dict
    from violet_ds.tasks import create_task

    listing = json.loads((state_dict_listings / "lavender_pretrain.json").read_text())
    state = {k: torch.empty(shape, device="meta") for k, shape in listing["tensors"].items()}
    converted = convert_official_state_dict(state).state_dict
    with torch.device("meta"):
        model = create_model("violet-v2")
        task = create_task("pretrain", model, TaskConfig(head_style="mlm", loss_weights={"vtm": 1.0, "mlm": 1.0,
                                                                                          "mvm": 0.0}),
                           Tokenizer(bert_dir))
    own = task.state_dict()
    assert sorted(set(converted) - set(own)) == [] and sorted(set(own) - set(converted)) == []
    assert tuple(own["heads.task_embedding.weight"].shape) == tuple(listing["tensors"]["emb_task"])


def test_lavender_run_keeps_the_frozen_task_table_in_checkpoints(demo, tmp_path):
    """DeepSpeed saves and consolidates the frozen table; the run rebuilds strictly and exports as a directory."""
    from engine_support import run_cli, tiny_config, write_config

    from violet_ds.cli import main
    from violet_ds.pretrained import from_pretrained, load_run

    config = tiny_config(demo, tmp_path, "lav", run__max_steps=2, run__save_every=0, run__log_sample_indices=False)
    config["task"].update(head_style="mlm", loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0})
    run_cli(write_config(config, tmp_path / "lav.yaml"))
    task = load_run(tmp_path / "lav")[0]
    torch.manual_seed(7)  # the run's engine.seed: the same initial table
    fresh = _task_plain(demo, head_style="mlm", loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0})
    table = task.heads["task_embedding"].weight
    assert not table.requires_grad
    assert torch.allclose(table, fresh.heads["task_embedding"].weight, rtol=1e-2, atol=1e-3)  # bf16 copy
    main(["export", "--checkpoint", str(tmp_path / "lav"), "--format", "dir", "--output", str(tmp_path / "out")])
    assert torch.equal(from_pretrained(tmp_path / "out").heads["task_embedding"].weight, table)


def _task_plain(demo, **cfg):
    from violet_ds.config import ModelConfig, TaskConfig
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import build_model
    from violet_ds.tasks import create_task

    tokenizer = Tokenizer(demo / "tokenizer")
    model = build_model(ModelConfig(name="violet-tiny", overrides=dict(TINY)))
    return create_task("pretrain", model, TaskConfig(**cfg), tokenizer)


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_multitask_round_trip_and_predictor(demo, tmp_path, head_style):
    """A multitask model directory names no data file (answer words and labels inlined) and predicts."""
    from violet_ds.predict import Predictor
    from violet_ds.pretrained import from_pretrained, save_pretrained

    tasks = [{"task": "qa_oe", "key": "qa", "train": [0], "options": {"answer_vocab": str(demo / "txt_qaoe.json")}},
             {"task": "qa_mc", "key": "mc", "train": [1]},
             {"task": "action_cls", "key": "act", "train": [2], "options": {"labels": str(demo / "txt_action.json")}}]
    task = _task(demo, "multitask", head_style=head_style, options={"tasks": tasks})
    out = save_pretrained(task, tmp_path / "multi", clip={"num_frames": 2, "image_size": 64, "max_text_len": 16})
    assert str(demo) not in (out / "config.json").read_text()
    loaded = from_pretrained(out)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in task.state_dict().items())
    predictor = Predictor.load(out)
    assert predictor.answer_vocab == task.subtasks["qa"].vocab
    tokens = predictor.encode(_clip(1))
    assert predictor.open_ended(tokens, "what colour", top_k=2)[0]["answer"] in task.subtasks["qa"].vocab
    assert predictor.multiple_choice(tokens, ["left", "right"])["answer"] in (0, 1)


def test_inference_load_builds_no_mvm_teacher(demo, tmp_path):
    from violet_ds.pretrained import from_pretrained, save_pretrained

    task = _task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0}, mvm_targets={"pixel": 1.0, "hog": 1.0})
    out = save_pretrained(task, tmp_path / "m", clip={"num_frames": 2})
    full = from_pretrained(out)
    assert full.targets is not None and {"mvm", "mvm_hog"} <= set(full.heads)
    light = from_pretrained(out, mvm=False)
    assert light.targets is None and not any(name.startswith("mvm") for name in light.heads)
    assert all(torch.equal(v, full.state_dict()[k]) for k, v in light.state_dict().items())


def test_model_card_reads_the_run_metrics(tmp_path):
    from violet_ds.config import DataConfig, DataSource
    from violet_ds.pretrained import _run_card, model_card

    (tmp_path / "summary.json").write_text(json.dumps({"steps": 40, "epochs": 2, "last_loss": 1.25, "val": {}}))
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 2.0}, {"step": 20, "split": "val", "acc": 40.0},
        {"step": 40, "split": "val", "acc": 55.5, "num_samples": 30}]) + "\n")
    (tmp_path / "eval_test.json").write_text(json.dumps({"acc": 51.0}))
    data = DataConfig(train=[DataSource(tsv="frames/msvd_*.tsv", annotations="txt_msvd-qa.json")])
    card = _run_card(tmp_path, data, "runs/x/checkpoints/step40")
    assert card["steps"] == 40 and card["metrics"]["train loss (last logged)"] == 1.25
    assert card["metrics"]["val acc (step 40)"] == 55.5 and card["metrics"]["test acc"] == 51.0
    text = model_card({"model": {"name": "violet-v2"}, "task": {"name": "qa_oe", "head_style": "mlm"},
                       "heads": ["mlm"], "clip": {"num_frames": 5}, "dtype": "fp32"},
                      {"w": torch.zeros(3)}, card)
    assert "txt_msvd-qa.json" in text and "| val acc (step 40) | 55.5000 |" in text and "| steps | 40 |" in text


def test_unknown_config_keys_are_named_unless_a_newer_version_wrote_them(demo, tmp_path, recwarn):
    from violet_ds.pretrained import UnknownKeysError, from_pretrained, save_pretrained

    out = save_pretrained(_task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0}), tmp_path / "m")
    config = json.loads((out / "config.json").read_text())
    config["task"]["zz_future_option"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownKeysError, match=r"config\.json: task: unknown keys \['zz_future_option'\]"):
        from_pretrained(out)
    config["violet_ds_version"] = "99.0.0"
    (out / "config.json").write_text(json.dumps(config))
    from_pretrained(out)
    said = [str(w.message) for w in recwarn if "zz_future_option" in str(w.message)]
    assert len(said) == 1 and "newer violet_ds" in said[0]


def test_one_weights_entry_says_what_each_source_is(demo, tmp_path):
    from violet_ds.engine.export import read_weights
    from violet_ds.models.checkpoint_io import to_official_state_dict
    from violet_ds.pretrained import save_pretrained
    from violet_ds.weights import save_safetensors

    task = _task(demo, loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0})
    state = task.state_dict()
    save_pretrained(task, tmp_path / "m")
    save_safetensors(state, tmp_path / "w.safetensors")
    torch.save(to_official_state_dict(state), tmp_path / "official.pt")
    torch.save(state, tmp_path / "w.pt")
    kinds = {name: read_weights(tmp_path / name) for name in ("m", "w.safetensors", "official.pt", "w.pt")}
    assert {name: weights.kind for name, weights in kinds.items()} == {
        "m": "model_dir", "w.safetensors": "safetensors", "official.pt": "official", "w.pt": "torch"}
    assert kinds["m"].path == tmp_path / "m" / "model.safetensors"
    for weights in kinds.values():
        assert all(torch.equal(weights.state[key], value) for key, value in state.items() if key in weights.state)
    assert set(kinds["official.pt"].state) == set(state)
    with pytest.raises(FileNotFoundError, match="a run directory"):
        read_weights(tmp_path)
