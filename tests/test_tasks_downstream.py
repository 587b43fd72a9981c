"""Every downstream task in both head styles on a small build of the demo data: one training step,
evaluation through the engine's evaluator, plus the pieces with exact answers (answer slot, causal
captioning mask, decoding, zero-shot head check)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from violet_ds.config import DataConfig, DataSource, TaskConfig

def data_config(demo: Path, annotation: str) -> DataConfig:
    def source(split):
        return [DataSource(tsv=str(demo / "video_*.tsv"), annotations=str(demo / annotation), split=split)]

    return DataConfig(train=source("train"), val=source("val"), test=source("test"), tokenizer=str(demo / "tokenizer"),
                      num_frames=2, image_size=64, max_text_len=16, batch_size=4, num_workers=0)


def build(demo: Path, name: str, head_style: str, options=None, **fields):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    torch.manual_seed(0)
    tokenizer = Tokenizer(demo / "tokenizer")
    model = create_model("violet-tiny", vocab_size=384, max_frames=4)
    task = create_task(name, model, TaskConfig(name=name, head_style=head_style, options=dict(options or {}), **fields),
                       tokenizer)
    return task, tokenizer


CASES = {
    "qa_mc": ("txt_qamc.json", {}),
    "capmc": ("txt_capmc.json", {}),
    "qa_oe": ("txt_qaoe.json", {"answer_vocab": "{demo}/txt_qaoe.json"}),
    "fib": ("txt_fib.json", {"answer_vocab": "{demo}/txt_fib.json", "fill_in_blank": True}),
    "retrieval": ("txt_retrieval.json", {"pair_batch": 64}),
    "caption": ("txt_caption.json", {"max_gen_len": 4}),
    "action_cls": ("txt_action.json", {"labels": "{demo}/txt_action.json"}),
}


@pytest.mark.parametrize("head_style", ["head", "mlm"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_task_trains_and_evaluates(demo, case, head_style):
    from violet_ds.data.datasets import collate
    from violet_ds.engine.distributed import World
    from violet_ds.engine.evaluator import evaluate

    annotation, options = CASES[case]
    options = {k: v.format(demo=demo) if isinstance(v, str) else v for k, v in options.items()}
    name = {"capmc": "qa_mc", "fib": "qa_oe"}.get(case, case)
    task, tokenizer = build(demo, name, head_style, options)
    data = data_config(demo, annotation)
    train_set = next(iter(task.build_datasets(data, tokenizer, "train").values()))
    batch = collate([train_set[i] for i in range(4)])
    task.train()
    out = task(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in task.heads.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)

    splits = task.build_datasets(data, tokenizer, "test")
    loaders = {key: DataLoader(ds if name == "retrieval" else Subset(ds, range(min(6, len(ds)))), batch_size=4,
                               collate_fn=collate) for key, ds in splits.items()}
    metrics = evaluate(task, loaders, World())
    main = {"qa_mc": "acc", "qa_oe": "acc", "retrieval": "t2v_R@1", "caption": "CIDEr", "action_cls": "acc"}[name]
    assert main in metrics and 0.0 <= metrics[main] <= (1000.0 if name == "caption" else 100.0)
    rows = task.predictions()
    assert rows, "evaluate must leave per-sample predictions for predictions_<split>.jsonl"


def test_mc_mlm_listwise_adds_option_cross_entropy(demo):
    """qa_mc mlm style with `mlm_listwise`: LAVENDER's true/false loss plus CE over the options' log-odds."""
    import torch.nn.functional as F

    from violet_ds.data.datasets import collate

    losses = {}
    for weight in (0.0, 1.0):
        task, tokenizer = build(demo, "qa_mc", "mlm", {"mlm_listwise": weight})
        train_set = next(iter(task.build_datasets(data_config(demo, "txt_qamc.json"), tokenizer, "train").values()))
        batch = collate([train_set[i] for i in range(4)])
        task.eval()  # no dropout: the two builds see identical forward passes
        task.training = True  # but the training branch (MLM loss) of option_logits
        scores, loss = task.option_logits(batch)
        losses[weight] = (float(loss), float(F.cross_entropy(scores, batch["answer"])))
    binary, listwise = losses[0.0][0], losses[1.0][0]
    assert listwise == pytest.approx(binary + losses[1.0][1], rel=1e-5)


def test_mc_video_answer_loss_names_the_answer_from_the_video_alone(demo):
    """qa_mc with `video_answer_loss`: the option loss plus weight x a cross-entropy of `heads.video_answer` on the
    video fused with [CLS] [SEP] against the answer text's class; the same answer text has one key everywhere."""
    import zlib

    import torch.nn.functional as F

    from violet_ds.data.datasets import collate
    from violet_ds.tasks.common import encode_video, fuse_pairs, pooled_of

    task, tokenizer = build(demo, "qa_mc", "head", {"video_answer_loss": 0.5, "answer_buckets": 7})
    assert task.chance_losses() == {"loss_options": pytest.approx(float(torch.tensor(5.0).log()))}
    train_set = next(iter(task.build_datasets(data_config(demo, "txt_qamc.json"), tokenizer, "train").values()))
    items = [train_set[i] for i in range(4)]
    for item, record in zip(items, train_set.records):
        text = " ".join(record.options[record.answer].lower().split())
        assert item["answer_key"] == zlib.crc32(text.encode())
    batch = collate(items)
    task.eval()  # no dropout, so the pieces below recompute the same numbers
    task.training = True
    out = task(batch)
    tokens, mask = encode_video(task.model, batch["video"])
    empty = torch.tensor([[tokenizer.hf.cls_token_id, tokenizer.hf.sep_token_id]] * 4)
    pooled = pooled_of(fuse_pairs(task.model, tokens, mask, empty, torch.ones_like(empty)), tokens.shape[1])
    expected = F.cross_entropy(task.heads["video_answer"](pooled), batch["answer_key"] % 7).detach()
    assert float(out["loss_video_answer"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(out["loss_options"]) + 0.5 * float(expected), rel=1e-5)
    out["loss"].backward()
    assert task.heads["video_answer"].weight.grad.abs().sum() > 0
    # prediction never reads the head: evaluation scores are the option scores alone
    plain, _ = build(demo, "qa_mc", "head")
    plain.load_state_dict({k: v for k, v in task.state_dict().items() if "video_answer" not in k})
    plain.eval(), task.eval()
    torch.testing.assert_close(task.option_logits(batch)[0], plain.option_logits(batch)[0])
    with pytest.raises(ValueError, match="answer_buckets"):
        build(demo, "qa_mc", "head", {"video_answer_loss": 1.0, "answer_buckets": 1})


def test_answer_slot_and_true_false_score(demo):
    from violet_ds.tasks.common import SpecialIds, append_answer_mask, true_false_logits

    _, tokenizer = build(demo, "qa_mc", "head")
    special = SpecialIds.of(tokenizer)
    ids, mask = tokenizer.encode(["a red circle", "a big blue square moves left"], 8)
    new_ids, new_mask, position = append_answer_mask(ids, mask, special)
    # short row: [CLS] a red circle [SEP] [MASK] [SEP]; full row: text cut to keep the slot
    assert new_ids[0, position[0]] == special.mask and new_ids[0, position[0] + 1] == special.sep
    assert new_ids[0, position[0] - 1] == special.sep
    assert int(new_mask[0].sum()) == int(mask[0].sum()) + 2
    assert int(new_mask[1].sum()) == 8 and int(position[1]) == 6
    logits = torch.zeros(2, 10)
    logits[0, 3], logits[0, 4] = 2.0, 0.0
    logits[1, 3], logits[1, 4] = 0.0, 1.0
    score = true_false_logits(logits, 3, 4)
    # log-odds of the two-way softmax: log p(true) - log p(false) = logit difference
    assert score.tolist() == pytest.approx([2.0, -1.0])
    p_true = torch.stack([logits[:, 3], logits[:, 4]], 1).softmax(1)[:, 0]
    assert torch.equal(score.argsort(), p_true.argsort())


def test_caption_causal_mask_and_decoding(demo):
    from violet_ds.tasks.caption import causal_text_mask

    mask = causal_text_mask(2, torch.tensor([[1, 1, 1, 0]]), torch.float32)
    keep = mask[0, 0] == 0
    assert keep[:2, :2].all() and not keep[:2, 2:].any()          # video sees only video
    assert keep[2:, :2].all()                                     # text sees every video token
    assert keep[2 + 1, 2:].tolist() == [True, True, False, False]  # text token 1 sees tokens 0..1
    assert not keep[:, 5].any()                                   # padding is never attended

    task, tokenizer = build(demo, "caption", "mlm", {"max_gen_len": 5})
    task.eval()
    video = torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8)
    ids = torch.tensor([[tokenizer.cls_id] + [tokenizer.token_id("red")] * 3 + [tokenizer.mask_id, tokenizer.sep_id]])
    from violet_ds.tasks.common import encode_video

    with torch.no_grad():
        tokens, _ = encode_video(task.model, video[:1])
        full = task._text_logits(tokens, ids, torch.ones_like(ids))
        changed = ids.clone()
        changed[0, 4:] = tokenizer.token_id("blue")
        altered = task._text_logits(tokens, changed, torch.ones_like(ids))
    # causal: what a position sees does not depend on the text to its right
    torch.testing.assert_close(full[:, :4], altered[:, :4])
    greedy = task.generate(video)
    assert len(greedy) == 2 and all(len(words) <= 5 for words in greedy)
    banned = set(tokenizer.special_ids)
    assert not any(token in banned for words in greedy for token in words)
    task.options["beam_size"] = 1
    assert task.generate(video) == greedy
    task.options["beam_size"] = 3
    beams = task.generate(video)
    assert len(beams) == 2 and all(len(words) <= 5 for words in beams)


def test_zero_shot_needs_pretrained_heads(demo):
    from violet_ds.data.tokenizer import Tokenizer
    from violet_ds.models import create_model
    from violet_ds.tasks import create_task

    tokenizer = Tokenizer(demo / "tokenizer")
    model = create_model("violet-tiny", vocab_size=384, max_frames=4)
    with pytest.raises(ValueError, match="no zero-shot form"):
        create_task("zero_shot", model, TaskConfig(name="zero_shot", head_style="head", options={"task": "qa_oe"}),
                    tokenizer)
    task = create_task("zero_shot", model, TaskConfig(name="zero_shot", head_style="head",
                                                      options={"task": "retrieval"}), tokenizer)
    with pytest.raises(ValueError, match="pretraining heads"):
        task.evaluate_full({"texts": [], "videos": []}, None)
    # a pretraining checkpoint's VTM score head has exactly the names the zero-shot task needs
    pretrain = create_task("pretrain", create_model("violet-tiny", vocab_size=384, max_frames=4),
                           TaskConfig(name="pretrain", loss_weights={"vtm": 1.0, "mlm": 1.0, "mvm": 0.0}), tokenizer)
    state = {k: v for k, v in pretrain.state_dict().items() if k in task.state_dict()}
    task.load_state_dict(state, strict=False)
    assert task.missing_heads() == []
    torch.testing.assert_close(task.heads["score"][3].weight, pretrain.heads["score"][3].weight)
    with pytest.raises(RuntimeError, match="only evaluates"):
        task({})


def test_unknown_option_is_named(demo):
    with pytest.raises(ValueError, match="unknown task.options key.*bogus"):
        build(demo, "qa_mc", "head", {"bogus": 1})
