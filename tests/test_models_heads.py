"""Task heads: BERT-equivalent MLM head (tied / untied), score / answer head, MVM heads, classifier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from violet_ds.models.heads import AnswerHead, Classifier, MLMHead, MVMHead, ScoreHead, TaskEmbedding

torch.set_num_threads(1)


def test_mlm_head_equals_bert_prediction_head():
    """Same weights as transformers' BertOnlyMLMHead (the official `fc_mtm`) -> same logits."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32)
    bert_head = BertOnlyMLMHead(config).eval()
    for param in bert_head.parameters():
        nn.init.normal_(param, std=0.5)
    # transformers < 4.31 (the official checkpoints) shares one bias tensor between the two names
    bert_head.predictions.decoder.bias = bert_head.predictions.bias
    ours = MLMHead(32, 50)
    ours.load_state_dict({k[len("predictions."):]: v for k, v in bert_head.state_dict().items()
                          if k != "predictions.decoder.bias"}, strict=True)
    hidden = torch.randn(3, 4, 32)
    torch.testing.assert_close(ours(hidden), bert_head(hidden))


def test_tied_mlm_head_shares_the_embedding():
    embedding = nn.Embedding(50, 32)
    head = MLMHead(32, 50, tie_to=embedding)
    assert head.tied and "decoder.weight" not in head.state_dict()
    assert all(p is not embedding.weight for p in head.parameters())
    logits = head(torch.randn(2, 32))
    logits.sum().backward()
    assert embedding.weight.grad is not None and logits.shape == (2, 50)
    with torch.no_grad():
        embedding.weight[7] += 1.0
    assert head.decoder_weight is embedding.weight
    with pytest.raises(ValueError, match="tied embedding"):
        MLMHead(32, 51, tie_to=embedding)
    untied = MLMHead(32, 50)
    assert not untied.tied and tuple(untied.state_dict()["decoder.weight"].shape) == (50, 32)


def test_score_and_answer_heads_follow_official_layout():
    head = ScoreHead(16, out=1)
    assert set(head.state_dict()) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert tuple(head[1].weight.shape) == (32, 16) and isinstance(head[0], nn.Dropout)
    assert head(torch.randn(5, 16)).shape == (5, 1)
    # the last layer starts at zero: every candidate scores the same until training separates them
    assert torch.equal(head(torch.randn(5, 16)), torch.zeros(5, 1))
    answer = AnswerHead(16, 1000)
    assert answer(torch.randn(2, 16)).shape == (2, 1000)


@pytest.mark.parametrize("kind,channels,expected", [
    ("dense", 3, (2, 3, 3, 64, 96)),     # pixel: one 32x32 block of 3 channels per token
    ("dense", 1, (2, 3, 1, 64, 96)),     # hog / depth
    ("token", 8192, (2, 3, 2, 3, 8192)),  # vq ids
    ("feature", 1024, (2, 3, 2, 3, 1024)),  # 2d / 3d features
])
def test_mvm_head_layouts(kind, channels, expected):
    head = MVMHead(24, kind, channels)
    out = head(torch.randn(2, 3, 2, 3, 24))
    assert out.shape == expected
    out.float().mean().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dense_mvm_head_places_each_token_in_its_block():
    """PixelShuffle layout: token (i, j) writes exactly pixels [32i:32i+32, 32j:32j+32]."""
    torch.manual_seed(0)
    head = MVMHead(8, "dense", 2)
    tokens = torch.randn(1, 1, 2, 3, 8)
    base = head(tokens)
    tokens[0, 0, 1, 2] += 1.0
    diff = (head(tokens) - base).abs()[0, 0].amax(dim=0)
    changed = diff > 0
    assert changed[32:, 64:].all() and not changed[:32].any() and not changed[:, :64].any()
    with pytest.raises(ValueError, match="B, T, h, w, D"):
        head(torch.randn(2, 6, 8))
    with pytest.raises(ValueError, match="kind"):
        MVMHead(8, "pixels", 3)


def test_classifier_and_task_embedding():
    zero = Classifier(16, 10, zero_init=True)
    assert zero(torch.randn(3, 16)).abs().max() == 0
    assert Classifier(16, 10)(torch.randn(3, 16)).shape == (3, 10)
    assert tuple(TaskEmbedding(10, 16).weight.shape) == (10, 16)
