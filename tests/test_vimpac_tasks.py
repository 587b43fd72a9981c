"""VIMPAC tasks: InfoNCE vs a hand computation (one process and two gloo ranks), pretraining loss
composition, action finetuning with multi-view averaging."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from violet_ds.engine.distributed import free_port
from violet_ds.registry import MODELS, TASKS
from violet_ds.tasks.vimpac import VimpacActionTask, VimpacPretrainTask, gather_with_local_grad, symmetric_infonce

torch.set_num_threads(2)

TINY = dict(hidden_size=16, num_layers=1, num_heads=4, head_dim=4, mlp_size=24, frames=3, height=4, width=4)


def _hand_infonce(a, b, tau):
    """Eq. 19/20 written out with explicit sums: returns (L_a, L_b)."""
    def unit(row):
        norm = math.sqrt(sum(v * v for v in row))
        return [v / norm for v in row]

    a = [unit(x) for x in a.tolist()]
    b = [unit(x) for x in b.tolist()]
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731

    def one_direction(query, other):
        total = 0.0
        for i in range(len(query)):
            positive = math.exp(dot(query[i], other[i]) / tau)
            denominator = sum(math.exp(dot(query[i], other[j]) / tau) for j in range(len(other)))
            denominator += sum(math.exp(dot(query[i], query[j]) / tau) for j in range(len(query)) if j != i)
            total += -math.log(positive / denominator)
        return total / len(query)

    return one_direction(a, b), one_direction(b, a)


def test_infonce_matches_hand_computation():
    torch.manual_seed(0)
    a, b = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    out = symmetric_infonce(a, b, temperature=0.2)
    hand_a, hand_b = _hand_infonce(a, b, 0.2)
    assert out["loss_a"].item() == pytest.approx(hand_a, rel=1e-5)
    assert out["loss_b"].item() == pytest.approx(hand_b, rel=1e-5)
    # identical clips: the positive dominates, accuracy 1
    same = symmetric_infonce(a, a.clone(), temperature=0.05)
    assert same["accuracy"].item() == 1.0
    gathered, offset = gather_with_local_grad(a)
    assert gathered is a and offset == 0


def _rank_main(rank, world, port, a, b, counts, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(counts[:rank])
        local_a = a[start:start + counts[rank]].clone().requires_grad_(True)
        local_b = b[start:start + counts[rank]].clone().requires_grad_(True)
        out = symmetric_infonce(local_a, local_b, temperature=0.2)
        (out["loss_a"] + out["loss_b"]).backward()
        results[rank] = (out["loss_a"].item(), out["loss_b"].item(), local_a.grad.abs().sum().item())
        dist.barrier()  # both ranks done before either tears gloo down (see test_tasks_retrieval)
    finally:
        dist.destroy_process_group()


def test_infonce_all_gathers_negatives_across_two_ranks():
    torch.manual_seed(1)
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    counts = [3, 2]  # uneven: the last batch of an epoch
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(_rank_main, args=(2, free_port(), a, b, counts, results), nprocs=2, start_method="spawn")
    # per-row losses of the global batch, averaged over each rank's rows
    full = [_hand_infonce_rows(a, b, 0.2, rows) for rows in ([0, 1, 2], [3, 4])]
    for rank in range(2):
        loss_a, loss_b, grad = results[rank]
        assert loss_a == pytest.approx(full[rank][0], rel=1e-6)
        assert loss_b == pytest.approx(full[rank][1], rel=1e-6)
        assert grad > 0


def _hand_infonce_rows(a, b, tau, rows):
    """Hand InfoNCE over the whole batch, averaged over the given query rows only."""
    losses_a, losses_b = [], []
    for i in rows:
        order = [i] + [j for j in range(len(a)) if j != i]
        # the loss of row i does not depend on the other rows' order: reuse the hand formula on a
        # permutation that puts i first, and read its first term via a one-row average
        perm_a, perm_b = a[order], b[order]
        losses_a.append(_hand_row(perm_a, perm_b, tau))
        losses_b.append(_hand_row(perm_b, perm_a, tau))
    return sum(losses_a) / len(rows), sum(losses_b) / len(rows)


def _hand_row(query, other, tau):
    q = torch.nn.functional.normalize(query, dim=-1).tolist()
    o = torch.nn.functional.normalize(other, dim=-1).tolist()
    dot = lambda x, y: sum(p * r for p, r in zip(x, y))  # noqa: E731
    positive = math.exp(dot(q[0], o[0]) / tau)
    denominator = sum(math.exp(dot(q[0], y) / tau) for y in o) + sum(math.exp(dot(q[0], y) / tau) for y in q[1:])
    return -math.log(positive / denominator)


def _tokens(batch, generator, pad_frames=0):
    tokens = torch.randint(0, 8192, (batch, 3, 4, 4), generator=generator)
    if pad_frames:
        tokens[:, -pad_frames:] = 8193
    return tokens


def test_pretrain_task_loss_composition_and_gradients():
    torch.manual_seed(2)
    gen = torch.Generator().manual_seed(2)
    model = MODELS.create("vimpac-small", **TINY)
    cfg = SimpleNamespace(options={"num_blocks": 3, "contrastive_hidden": 32, "contrastive_out": 8, "alpha": 0.5})
    task = TASKS.create("vimpac_pretrain", model=model, cfg=cfg, tokenizer=None)
    assert isinstance(task, VimpacPretrainTask) and set(task.heads) == {"mlm", "contrastive"}
    batch = {"vq_tokens": _tokens(4, gen, pad_frames=1), "vq_tokens_b": _tokens(4, gen), "index": torch.arange(4)}
    out = task(batch)
    torch.testing.assert_close(out["loss"], out["mask_loss"] + out["contrastive_loss"])
    assert out["mask_loss"].item() == pytest.approx(math.log(8192), rel=0.2)
    out["loss"].backward()
    for name in ("model.backbone.layers.0.temporal.qkv.weight", "heads.mlm.bias",
                 "heads.contrastive.mlp.0.weight", "model.backbone.embeddings.token.weight"):
        assert dict(task.named_parameters())[name].grad is not None, name
    # the tied matrix is stored once, under the backbone
    keys = task.state_dict().keys()
    assert "model.backbone.embeddings.token.weight" in keys and not any(k.startswith("heads.mlm.tied") for k in keys)

    # contrastive term = alpha * tau * (L_a + L_b) on the head's features of the same forward
    task.eval()
    torch.manual_seed(7)
    out = task(batch)
    torch.manual_seed(7)
    tokens, mask, output, _ = task._shared_forward(batch)
    features = task.heads["contrastive"](output.cls)
    nce = symmetric_infonce(*features.chunk(2), 0.2)
    torch.testing.assert_close(out["contrastive_loss"], 0.5 * 0.2 * (nce["loss_a"] + nce["loss_b"]))
    assert not mask[tokens == 8193].any(), "[PAD] is never masked"
    assert mask[tokens != 8193].any()

    metrics = task.evaluate_end([task.evaluate_step(batch), task.evaluate_step(batch)], world=None)
    assert set(metrics) == {"mask_acc", "mask_loss", "contrastive_acc"}
    assert 0.0 <= metrics["mask_acc"] <= 1.0 and metrics["mask_loss"] > 0


def test_pretrain_options_are_validated_and_iid_without_contrastive():
    model = MODELS.create("vimpac-small", **TINY)
    with pytest.raises(ValueError, match="unknown task.options"):
        VimpacPretrainTask(model, SimpleNamespace(options={"tau": 0.1}))
    task = VimpacPretrainTask(model, SimpleNamespace(options={"masking": "iid", "mask_ratio": 0.5, "contrastive": False}))
    assert set(task.heads) == {"mlm"}
    out = task({"vq_tokens": _tokens(2, torch.Generator().manual_seed(0))})
    assert "contrastive_loss" not in out and 0.3 < out["mask_ratio"].item() < 0.7
    with pytest.raises(KeyError, match="vq_tokens"):
        task({"video": torch.zeros(1)})


def test_action_task_zero_init_and_view_averaging():
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    model = MODELS.create("vimpac-small", **TINY)
    task = TASKS.create("vimpac_action", model=model, cfg=SimpleNamespace(num_classes=6, options={}), tokenizer=None)
    assert isinstance(task, VimpacActionTask)
    batch = {"vq_tokens": _tokens(3, gen), "label": torch.tensor([0, 4, 5])}
    out = task(batch)
    assert out["loss"].item() == pytest.approx(math.log(6), rel=1e-6), "zero-initialised classifier"
    out["loss"].backward()
    assert task.heads["classifier"].linear.weight.grad.abs().sum() > 0
    with torch.no_grad():
        task.heads["classifier"].linear.weight.normal_()
    task.eval()
    views = torch.stack([_tokens(3, gen) for _ in range(4)], dim=1)  # (B=3, V=4, T, H, W)
    step = task.evaluate_step({"vq_views": views, "label": torch.tensor([0, 4, 5]), "index": torch.arange(3)})
    with torch.no_grad():
        manual = torch.stack([task.logits(views[:, v]).softmax(-1) for v in range(4)]).mean(0)
    assert torch.equal(step["pred"], manual.argmax(-1))
    task.options["eval_view_chunk"] = 5  # chunking must not change the result
    torch.testing.assert_close(task.view_probabilities(views), manual)
    metrics = task.evaluate_end([step], world=None)
    assert metrics["count"] == 3 and metrics["acc"] == pytest.approx(float((manual.argmax(-1) == torch.tensor([0, 4, 5])).float().mean()))
    assert "top5_acc" in metrics
    with pytest.raises(ValueError, match="num_classes"):
        VimpacActionTask(model, SimpleNamespace(num_classes=0, options={}))
