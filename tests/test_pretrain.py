"""Pretraining objectives on a hand-made batch: each loss equals its definition computed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from violet_ds.config import TaskConfig
from violet_ds.data.frames import normalize
from violet_ds.data.tokenizer import Tokenizer
from violet_ds.models import create_model
from violet_ds.tasks import create_task
from violet_ds.tasks.common import append_answer_mask

WORDS = ["a", "red", "blue", "circle", "square", "moves", "left", "right", "true", "false", "big", "small"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("vocab")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return Tokenizer(folder)


def _model():
    torch.manual_seed(0)
    return create_model("violet-tiny", vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0, max_frames=4)


def _task(tokenizer, **cfg):
    task = create_task("pretrain", _model(), TaskConfig(name="pretrain", **cfg), tokenizer)
    return task.eval()


def _batch(tokenizer, batch_size: int = 3):
    generator = torch.Generator().manual_seed(1)
    video = torch.randint(0, 256, (batch_size, 2, 3, 64, 64), dtype=torch.uint8, generator=generator)
    texts = ["a red circle moves left", "a blue square", "a big small circle moves right"][:batch_size]
    ids, mask = tokenizer.encode(texts, 12)
    return {"video": video, "text_ids": ids, "text_mask": mask, "index": torch.arange(batch_size)}


def _pooled(task, video, ids, mask):
    return task.model(normalize(video), ids, mask)


def test_vtm_is_cross_entropy_over_in_batch_negatives_with_temperature(tokenizer, monkeypatch):
    task = _task(tokenizer, loss_weights={"vtm": 1.0}, vtm_negatives=3, vtm_temperature=0.05)
    batch = _batch(tokenizer)
    negatives = torch.tensor([[1, 2], [2, 0], [0, 1]])  # min(B, 3+1) - 1 = 2 negatives each
    monkeypatch.setattr(task, "_negatives", lambda size, device: negatives)
    torch.nn.init.normal_(task.heads["score"][3].weight, std=0.5)  # starts at zero: all logits would tie
    out = task(batch)
    logits = torch.zeros(3, 3)
    for video_index in range(3):
        for column, text_index in enumerate([video_index] + negatives[video_index].tolist()):
            output = _pooled(task, batch["video"][video_index:video_index + 1], batch["text_ids"][text_index:text_index + 1],
                             batch["text_mask"][text_index:text_index + 1])
            logits[video_index, column] = task.heads["score"](output.pooled).squeeze()
    expected = F.cross_entropy(logits / 0.05, torch.zeros(3, dtype=torch.long))
    assert logits.std() > 1e-3
    assert torch.allclose(out["loss_vtm"], expected, atol=1e-4), (out["loss_vtm"], expected)
    assert torch.allclose(out["loss"], expected, atol=1e-4)
    assert set(out) == {"loss", "loss_vtm", "acc_vtm"}


def test_mlm_predicts_every_masked_non_special_token(tokenizer):
    task = _task(tokenizer, loss_weights={"mlm": 1.0}, mlm_probability=1.0)
    batch = _batch(tokenizer)
    out = task(batch)
    ids, mask = batch["text_ids"], batch["text_mask"]
    special = torch.isin(ids, torch.tensor(tokenizer.special_ids))
    chosen = mask.bool() & ~special
    masked = torch.where(chosen, torch.full_like(ids, tokenizer.mask_id), ids)
    text_hidden = _pooled(task, batch["video"], masked, mask).text_hidden
    expected = F.cross_entropy(task.heads["mlm"](text_hidden[chosen]), ids[chosen])
    assert torch.allclose(out["loss_mlm"], expected, atol=1e-4), (out["loss_mlm"], expected)


def test_mvm_pixel_l1_over_masked_patches_only(tokenizer, monkeypatch):
    task = _task(tokenizer, loss_weights={"mvm": 1.0}, mvm_targets={"pixel": 1.0}, mvm_strategies=["rm"])
    batch = _batch(tokenizer, 2)
    token_mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    token_mask[0, 0, 1, 0] = True
    token_mask[1, 1, 0, 1] = True
    import violet_ds.tasks.pretrain as pretrain_module

    monkeypatch.setattr(pretrain_module, "mask_video_tokens", lambda *a, **k: (token_mask, torch.zeros(2, dtype=torch.long)))
    out = task(batch)
    video = normalize(batch["video"])
    masked_video = video.clone()
    masked_video[0, 0, :, 32:64, 0:32] = 0
    masked_video[1, 1, :, 0:32, 32:64] = 0
    output = task.model(masked_video, batch["text_ids"], batch["text_mask"])
    patches = output.video_hidden.reshape(2, 2, 5, -1)[:, :, 1:].reshape(2, 2, 2, 2, -1)
    pred = task.heads["mvm"](patches)  # (B, T, 3, 64, 64)
    expected = torch.cat([(pred[0, 0, :, 32:64, 0:32] - video[0, 0, :, 32:64, 0:32]).abs().flatten(),
                          (pred[1, 1, :, 0:32, 32:64] - video[1, 1, :, 0:32, 32:64]).abs().flatten()]).mean()
    assert torch.allclose(out["loss_mvm"], expected, atol=1e-4), (out["loss_mvm"], expected)


def test_vq_target_from_batch_tokens(tokenizer):
    task = _task(tokenizer, loss_weights={"mvm": 1.0}, mvm_targets={"vq": 1.0}, mvm_strategies=["bm"], mvm_ratio=0.5)
    batch = _batch(tokenizer, 2)
    batch["vq_tokens"] = torch.randint(0, 8192, (2, 2, 2, 2))
    out = task(batch)
    # 8192-way classification starts near log(8192)
    assert 7.0 < out["loss_mvm"].item() < 11.0
    assert task.heads["mvm"].kind == "token" and task.heads["mvm"].channels == 8192


def test_lavender_vtm_as_mlm_and_true_false_scoring(tokenizer, monkeypatch):
    task = _task(tokenizer, head_style="mlm", loss_weights={"vtm": 1.0}, vtm_negatives=1)
    assert "score" not in task.heads and "mlm" in task.heads
    batch = _batch(tokenizer, 2)
    monkeypatch.setattr(task, "_negatives", lambda size, device: torch.tensor([[1], [0]]))
    out = task(batch)
    true_id, false_id = tokenizer.token_id("true"), tokenizer.token_id("false")
    losses = []
    for video_index, text_index, answer in [(0, 0, true_id), (0, 1, false_id), (1, 1, true_id), (1, 0, false_id)]:
        ids, mask, position = append_answer_mask(batch["text_ids"][text_index:text_index + 1],
                                                 batch["text_mask"][text_index:text_index + 1], task.special)
        assert ids[0, position[0]] == tokenizer.mask_id and ids[0, position[0] + 1] == tokenizer.sep_id
        output = _pooled(task, batch["video"][video_index:video_index + 1], ids, mask)
        logits = task.heads["mlm"](output.text_hidden[0, position[0]])
        losses.append(F.cross_entropy(logits[None], torch.tensor([answer])))
    assert torch.allclose(out["loss_vtm"], torch.stack(losses).mean(), atol=1e-4)

    # scoring = softmax over {true, false} at [MASK]; a head biased towards "true" says match
    probability = task.match_probability(batch["video"], batch["text_ids"], batch["text_mask"])
    ids, mask, position = append_answer_mask(batch["text_ids"], batch["text_mask"], task.special)
    output = _pooled(task, batch["video"], ids, mask)
    logits = task.heads["mlm"](output.text_hidden[torch.arange(2), position])
    manual = torch.softmax(torch.stack([logits[:, true_id], logits[:, false_id]], 1), 1)[:, 0]
    assert torch.allclose(probability, manual, atol=1e-5)
    with torch.no_grad():
        task.heads["mlm"].bias[true_id] += 50.0
    assert (task.match_probability(batch["video"], batch["text_ids"], batch["text_mask"]) > 0.999).all()
    with torch.no_grad():
        task.heads["mlm"].bias[false_id] += 100.0
    assert (task.match_probability(batch["video"], batch["text_ids"], batch["text_mask"]) < 0.001).all()


def test_all_objectives_weighted_sum_backward_and_attended_masking(tokenizer):
    task = _task(tokenizer, loss_weights={"vtm": 0.5, "mlm": 2.0, "mvm": 1.5}, mvm_strategies=["rm", "bm", "am"])
    task.train()
    out = task(_batch(tokenizer))
    expected = 0.5 * out["loss_vtm"] + 2.0 * out["loss_mlm"] + 1.5 * out["loss_mvm"]
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    out["loss"].backward()
    assert task.heads["mvm"].proj.weight.grad is not None and task.heads["score"][1].weight.grad is not None
    images = task.visualize(_batch(tokenizer))
    # labelled panels, frames side by side
    panels = ("input", "masked_input", "target", "reconstruction", "reconstruction_in_holes")
    assert set(images) == {f"mvm_pixel/{panel}" for panel in panels}
    for image in images.values():
        assert image.shape == (3, 64, 2 * 64) and 0 <= image.min() and image.max() <= 1
    # pixel MVM regresses the frames themselves; the masked input differs from them in the masked patches
    assert torch.equal(images["mvm_pixel/target"], images["mvm_pixel/input"])
    assert not torch.equal(images["mvm_pixel/masked_input"], images["mvm_pixel/input"])


def test_config_errors_name_the_key(tokenizer):
    with pytest.raises(ValueError, match="unknown loss_weights keys"):
        _task(tokenizer, loss_weights={"vtm": 1.0, "itm": 1.0})
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _task(tokenizer, loss_weights={"vtm": 0.0})
    with pytest.raises(ValueError, match="mvm_strategies"):
        _task(tokenizer, loss_weights={"mvm": 1.0}, mvm_strategies=["rm", "random"])
    with pytest.raises(KeyError, match="nonexistent"):
        _task(tokenizer, loss_weights={"mvm": 1.0}, mvm_targets={"nonexistent": 1.0})


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_batched_passes_equal_one_pass_per_objective(tokenizer, head_style):
    """The clean and masked clips share one backbone call and the VTM / MLM / MVM pairs one cross-modal call
    (one word-table lookup): same losses and gradients as a call per clip and per objective (rows do not
    interact), attended masking and LAVENDER's separate VTM pass included."""
    torch.manual_seed(0)
    model = create_model("violet-tiny", vocab_size=64, max_frames=4)
    task = create_task("pretrain", model, TaskConfig(name="pretrain", head_style=head_style,
                                                     loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0},
                                                     mvm_strategies=["rm", "bm", "am"], vtm_negatives=1),
                       tokenizer).train()
    if head_style == "head":
        torch.nn.init.normal_(task.heads["score"][3].weight, std=0.5)  # zero at init: VTM would carry no gradient
    results = []
    for batched in (True, False):
        task.batch_passes = batched
        task.zero_grad()
        torch.manual_seed(5)
        out = task(_batch(tokenizer))
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}))
    (ours, our_grads), (ref, ref_grads) = results
    for key in ("loss", "loss_vtm", "loss_mlm", "loss_mvm"):
        torch.testing.assert_close(ours[key], ref[key], rtol=1e-6, atol=1e-6)
    assert our_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        # the key bias has no true gradient (softmax ignores a per-query constant): float noise around 0
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_lavender_vtm_listwise_adds_cross_entropy_over_candidates(tokenizer, monkeypatch):
    """`vtm_listwise` adds, to LAVENDER's per-pair true/false loss, a cross-entropy over each video's candidates'
    true/false log-odds divided by vtm_temperature (own text first); 0 leaves LAVENDER's loss alone."""
    batch = _batch(tokenizer, 3)
    negatives = torch.tensor([[1, 2], [2, 0], [0, 1]])
    losses = {}
    for weight in (0.0, 0.5):
        task = _task(tokenizer, head_style="mlm", loss_weights={"vtm": 1.0}, vtm_negatives=2, vtm_temperature=0.1,
                     vtm_listwise=weight)
        monkeypatch.setattr(task, "_negatives", lambda size, device: negatives)
        out = task(batch)
        losses[weight] = float(out["loss"])
        assert ("loss_vtm_listwise" in out) == bool(weight)
    # the log-odds of every (video, candidate) pair, by hand
    ids, mask, position = append_answer_mask(batch["text_ids"], batch["text_mask"], task.special)
    odds = torch.zeros(3, 3)
    true_id, false_id = tokenizer.token_id("true"), tokenizer.token_id("false")
    with torch.no_grad():
        for video_index in range(3):
            for column, text_index in enumerate([video_index] + negatives[video_index].tolist()):
                output = _pooled(task, batch["video"][video_index:video_index + 1], ids[text_index:text_index + 1],
                                 mask[text_index:text_index + 1])
                logits = task.heads["mlm"](output.text_hidden[0, position[text_index]])
                odds[video_index, column] = logits[true_id] - logits[false_id]
    listwise = F.cross_entropy(odds / 0.1, torch.zeros(3, dtype=torch.long))
    assert losses[0.5] == pytest.approx(losses[0.0] + 0.5 * float(listwise), rel=1e-4)
    assert float(out["loss_vtm_listwise"]) == pytest.approx(float(listwise), rel=1e-4)
    with pytest.raises(ValueError, match="vtm_listwise"):
        _task(tokenizer, head_style="head", loss_weights={"vtm": 1.0}, vtm_listwise=1.0)


class _DeviceReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: reading a value back (`item()`,
    `bool()`), `nonzero`, and boolean-mask selection or assignment (their output size lives on the device)."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::masked_scatter"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") and any(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] if len(args) > 1 else []) or [])
        if name in self.READS or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head_style", ["head", "mlm"])
def test_pretraining_step_never_waits_for_the_device(tokenizer, head_style):
    """VTM + MLM + MVM forward and backward read nothing back from the device: no `item()`/`bool()` on a device
    tensor, no boolean-mask selection (on a GPU each one stalls the host until the GPU catches up; 18 of them per
    step before). Blockwise masking (`bm`) still checks its coverage once per round of blocks; `rm` is used."""
    task = create_task("pretrain", _model(), TaskConfig(name="pretrain", head_style=head_style,
                                                        loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 1.0},
                                                        mvm_strategies=["rm"], vtm_negatives=2,
                                                        mlm_replace="bert"), tokenizer).train()
    batch = _batch(tokenizer)
    with _DeviceReads() as reads:
        out = task(batch)
        out["loss"].backward()
    assert reads.seen == []
    assert torch.isfinite(out["loss"]) and float(out["loss_mlm"].detach()) > 0


def test_mlm_joins_the_total_at_mlm_start_step(tokenizer):
    """`mlm_start_step`: before it (training) the total is VTM + MVM, MLM is still computed and logged; from it on,
    and always in evaluation, MLM counts with its weight. The trainer gives the step through `set_step`."""
    task = create_task("pretrain", _model(), TaskConfig(name="pretrain", loss_weights={"vtm": 1.0, "mlm": 0.5, "mvm": 1.0},
                                                        mvm_strategies=["rm"], vtm_negatives=2, mlm_probability=1.0,
                                                        mlm_start_step=10), tokenizer).train()
    batch = _batch(tokenizer)
    for step, mlm_counted in ((0, False), (9, False), (10, True)):
        task.set_step(step)
        torch.manual_seed(3)
        out = task(batch)
        others = out["loss_vtm"] + out["loss_mvm"]
        expected = others + 0.5 * out["loss_mlm"] if mlm_counted else others
        assert float(out["loss_mlm"]) > 0
        torch.testing.assert_close(out["loss"].detach(), expected, rtol=1e-6, atol=1e-6)
    task.eval().set_step(0)
    torch.manual_seed(3)
    out = task(batch)
    torch.testing.assert_close(out["loss"], out["loss_vtm"] + out["loss_mvm"] + 0.5 * out["loss_mlm"], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mlm_start_step must be >= 0"):
        create_task("pretrain", _model(), TaskConfig(name="pretrain", mlm_start_step=-1), tokenizer)
