"""Metrics on hand-made inputs whose answers are worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from violet_ds.metrics import (accuracy, bleu, caption_metrics, cider_d, normalize_caption, ranks_of_targets,
                               recall_metrics, retrieval_metrics, topk_accuracy, video_to_text_ranks)


def test_accuracy_counts_unanswerable_as_wrong():
    # 5 items, 3 right, one of the "right" ones is unanswerable (-1 == -1 must not count)
    pred = torch.tensor([1, 2, 3, -1, 0])
    target = torch.tensor([1, 2, 0, -1, 0])
    assert accuracy(pred, target) == pytest.approx(3 / 5)
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(logits, torch.tensor([1, 1, -1]), k=1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, torch.tensor([1, 1, -1]), k=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        accuracy(torch.tensor([1, 2]), torch.tensor([1]))


def test_ranks_with_ties():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],    # target 0 tied with two others
                           [0.9, 0.2, 0.2, 0.2],    # target 2: one higher, two equal others
                           [0.0, 0.0, 0.0, 1.0]])   # target 3: strictly best
    target = torch.tensor([0, 2, 3])
    assert ranks_of_targets(scores, target, "pessimistic").tolist() == [3.0, 4.0, 1.0]
    assert ranks_of_targets(scores, target, "optimistic").tolist() == [1.0, 2.0, 1.0]
    assert ranks_of_targets(scores, target, "mean").tolist() == [2.0, 3.0, 1.0]
    # a constant model cannot look good under the default rule
    constant = torch.zeros(4, 4)
    assert ranks_of_targets(constant, torch.arange(4)).tolist() == [4.0] * 4
    with pytest.raises(ValueError, match="out of range"):
        ranks_of_targets(scores, torch.tensor([0, 1, 4]))


def test_recall_and_median_rank():
    ranks = torch.tensor([1.0, 2.0, 6.0, 11.0])
    metrics = recall_metrics(ranks)
    assert metrics["R@1"] == pytest.approx(25.0)
    assert metrics["R@5"] == pytest.approx(50.0)
    assert metrics["R@10"] == pytest.approx(75.0)
    assert metrics["median_rank"] == pytest.approx(4.0)  # mean of the two middle ranks 2 and 6
    assert metrics["mean_rank"] == pytest.approx(5.0)
    assert recall_metrics(torch.tensor([3.0, 1.0, 7.0]))["median_rank"] == 3.0


def test_retrieval_metrics_several_captions_per_video():
    # 5 captions of 3 videos: captions 0,1 -> video 0, caption 2 -> video 1, captions 3,4 -> video 2
    text_to_video = torch.tensor([0, 0, 1, 2, 2])
    scores = torch.tensor([
        [0.9, 0.1, 0.0],   # t0: video 0 best -> rank 1
        [0.2, 0.8, 0.1],   # t1: video 1 above video 0 -> rank 2
        [0.3, 0.3, 0.3],   # t2: three-way tie -> pessimistic rank 3
        [0.1, 0.2, 0.7],   # t3: rank 1
        [0.5, 0.6, 0.4],   # t4: rank 3
    ])
    metrics = retrieval_metrics(scores, text_to_video)
    assert metrics["t2v_R@1"] == pytest.approx(40.0)
    assert metrics["t2v_R@5"] == pytest.approx(100.0)
    assert metrics["t2v_median_rank"] == pytest.approx(2.0)
    assert metrics["t2v_mean_rank"] == pytest.approx((1 + 2 + 3 + 1 + 3) / 5)
    # video -> text: best correct caption of each video among all 5 captions
    # video 0: column 0 = [.9,.2,.3,.1,.5]; correct t0 (.9) is the top -> 1
    # video 1: column 1 = [.1,.8,.3,.2,.6]; correct t2 (.3): t1 .8, t4 .6 higher -> 3
    # video 2: column 2 = [0,.1,.3,.7,.4]; best correct t3 (.7) -> 1
    v2t = video_to_text_ranks(scores, text_to_video)
    assert v2t.tolist() == [1.0, 3.0, 1.0]
    assert metrics["v2t_R@1"] == pytest.approx(200 / 3)
    assert metrics["v2t_median_rank"] == pytest.approx(1.0)
    # optimistic tie-breaking only changes the tied caption
    assert retrieval_metrics(scores, text_to_video, ties="optimistic")["t2v_R@1"] == pytest.approx(60.0)


def test_bleu_by_hand():
    # unigram precision 2/4, bigram 1/3 ("a b"), no trigram; lengths equal -> no brevity penalty
    hyp = {"x": "a b c d"}
    refs = {"x": ["a b e f"]}
    scores = bleu(hyp, refs, 2)
    assert scores[0] == pytest.approx(0.5, rel=1e-6)
    assert scores[1] == pytest.approx(math.sqrt(0.5 * (1 / 3)), rel=1e-6)
    # identical captions give 1.0 at every order; a short hypothesis is penalised
    assert bleu({"x": "the cat sat on the mat"}, {"x": ["the cat sat on the mat"]}) == pytest.approx([1.0] * 4)
    short = bleu({"x": "the cat"}, {"x": ["the cat sat on the mat"]}, 1)[0]
    assert short == pytest.approx(math.exp(1 - 6 / 2), rel=1e-6)  # precision 1, BP = exp(1 - r/c)


def test_cider_d_by_hand():
    # two documents with disjoint words: every n-gram has df=1 -> idf log(2); a perfect match has cosine 1
    # at orders 1 and 2 and no 3-/4-grams -> 10 * (1 + 1 + 0 + 0) / 4 = 5.0 per document
    hyp = {"a": "red circle", "b": "blue square"}
    refs = {"a": ["red circle"], "b": ["blue square"]}
    score, per_key = cider_d(hyp, refs)
    assert score == pytest.approx(5.0)
    assert per_key == pytest.approx({"a": 5.0, "b": 5.0})
    # a word shared by every document carries no information (idf 0): swapping it costs nothing at order 1
    hyp2 = {"a": "red thing", "b": "blue thing"}
    refs2 = {"a": ["red thing"], "b": ["blue thing"]}
    assert cider_d(hyp2, refs2)[0] == pytest.approx(5.0)
    wrong = cider_d({"a": "blue square", "b": "red circle"}, refs)[0]
    assert wrong == pytest.approx(0.0)
    metrics = caption_metrics(hyp, refs)
    assert metrics["CIDEr"] == pytest.approx(500.0)
    assert metrics["BLEU-1"] == pytest.approx(100.0, rel=1e-6)


def test_caption_normalisation_and_errors():
    assert normalize_caption("A Man, riding a horse!") == ["a", "man", "riding", "a", "horse"]
    with pytest.raises(ValueError, match="no references"):
        cider_d({"a": "x"}, {"b": ["x"]})
