"""Evaluation metrics of the downstream tasks: accuracy, retrieval recall / median rank, BLEU, CIDEr-D.

Everything here is plain torch / Python and deterministic, so the numbers can be checked by hand in
tests. Captioning scores follow the conventions of the COCO caption evaluation code that published
VIOLET / LAVENDER numbers were computed with (corpus-level BLEU with the "closest" reference length,
CIDEr-D with sigma 6, clipped tf-idf and a x10 scale, document frequencies from the references of the
evaluated set), so that numbers are comparable; no Java tokenizer is needed because captions are
normalised by `normalize_caption` instead (lower case, punctuation removed).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, List, Literal, Mapping, Sequence, Tuple

import torch

TieRule = Literal["pessimistic", "optimistic", "mean"]


# ----------------------------------------------------------------------------------------- accuracy
def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of items whose prediction equals the target, over *all* items.

    A target < 0 marks an item whose answer is outside the answer vocabulary (unanswerable): it can
    never be matched and counts as wrong, as in the official evaluation, so the denominator is the
    whole test set.
    """
    predictions = torch.as_tensor(predictions).reshape(-1)
    targets = torch.as_tensor(targets).reshape(-1)
    if predictions.shape != targets.shape:
        raise ValueError(f"accuracy: {predictions.numel()} predictions for {targets.numel()} targets")
    if targets.numel() == 0:
        raise ValueError("accuracy: empty evaluation set")
    correct = (predictions == targets) & (targets >= 0)
    return correct.double().mean().item()


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy from `(N, C)` scores; targets < 0 count as wrong."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    hit = (top == targets.reshape(-1, 1)).any(dim=-1) & (targets >= 0)
    return hit.double().mean().item()


# ---------------------------------------------------------------------------------------- retrieval
def _rank_with_ties(higher: torch.Tensor, equal: torch.Tensor, ties: str) -> torch.Tensor:
    """1-based rank from the counts of competitors scoring higher / equal, under a tie rule."""
    if ties == "pessimistic":
        return 1.0 + higher + equal
    if ties == "optimistic":
        return 1.0 + higher
    if ties == "mean":
        return 1.0 + higher + equal / 2.0
    raise ValueError(f"unknown tie rule {ties!r} (pessimistic, optimistic, mean)")


def ranks_of_targets(scores: torch.Tensor, target_index: torch.Tensor, ties: TieRule = "pessimistic") -> torch.Tensor:
    """1-based rank of each row's target column in a `(rows, columns)` score matrix.

    Ties with the target's score are resolved by `ties`: "pessimistic" ranks the target after every
    column with an equal score (a model that gives all pairs the same score gets rank = columns, not
    1, so degenerate models cannot look good), "optimistic" before them, "mean" in the middle (the
    expected rank under a random tie break). Returns float ranks `(rows,)`.
    """
    scores = scores.float()
    target_index = target_index.long().reshape(-1)
    if scores.dim() != 2 or scores.shape[0] != target_index.numel():
        raise ValueError(f"ranks_of_targets: scores {tuple(scores.shape)} vs {target_index.numel()} targets")
    if scores.shape[0] and (target_index.min() < 0 or target_index.max() >= scores.shape[1]):
        raise ValueError(f"ranks_of_targets: target index out of range [0, {scores.shape[1]})")
    target_score = scores.gather(1, target_index[:, None])
    higher = (scores > target_score).sum(dim=1).float()
    equal_others = (scores == target_score).sum(dim=1).float() - 1.0
    return _rank_with_ties(higher, equal_others, ties)


def recall_metrics(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> Dict[str, float]:
    """R@k (percent), median and mean rank from 1-based ranks."""
    ranks = ranks.double()
    if ranks.numel() == 0:
        raise ValueError("recall_metrics: no queries")
    out = {f"{prefix}R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in ks}
    # torch.median returns the lower of the two middle values; the usual definition averages them.
    out[f"{prefix}median_rank"] = float(ranks.quantile(0.5).item())
    out[f"{prefix}mean_rank"] = float(ranks.mean().item())
    return out


def retrieval_metrics(scores: torch.Tensor, text_to_video: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                      ties: TieRule = "pessimistic") -> Dict[str, float]:
    """Text-to-video and video-to-text metrics from a `(num_texts, num_videos)` score matrix.

    `text_to_video[i]` is the column of the video that text `i` describes; a video may have several
    texts (several captions per video). Text-to-video ranks the one correct video for each text
    (keys `t2v_*`). Video-to-text ranks all texts for each video that has at least one text, and takes
    the best rank among its correct texts (keys `v2t_*`), the usual convention with several captions.
    """
    text_to_video = text_to_video.long().reshape(-1)
    out = recall_metrics(ranks_of_targets(scores, text_to_video, ties), ks, prefix="t2v_")
    out.update(recall_metrics(video_to_text_ranks(scores, text_to_video, ties), ks, prefix="v2t_"))
    return out


def video_to_text_ranks(scores: torch.Tensor, text_to_video: torch.Tensor, ties: TieRule = "pessimistic") -> torch.Tensor:
    """Best 1-based rank among each video's correct texts, for videos that have at least one text."""
    scores_v = scores.float().t()  # (videos, texts)
    num_videos, num_texts = scores_v.shape
    correct = torch.zeros(num_videos, num_texts, dtype=torch.bool)
    correct[text_to_video, torch.arange(num_texts)] = True
    has_text = correct.any(dim=1)
    scores_v, correct = scores_v[has_text], correct[has_text]
    # the best correct text: the highest-scoring one; ties among correct texts do not matter
    best_correct = scores_v.masked_fill(~correct, float("-inf")).max(dim=1).values[:, None]
    higher_wrong = ((scores_v > best_correct) & ~correct).sum(dim=1).float()
    equal_wrong = ((scores_v == best_correct) & ~correct).sum(dim=1).float()
    return _rank_with_ties(higher_wrong, equal_wrong, ties)


# --------------------------------------------------------------------------------------- captioning
_PUNCTUATION = re.compile(r"[^\w\s']|_")


def normalize_caption(text: str) -> List[str]:
    """Lower-case words with punctuation removed (stands in for the PTB tokenizer, which needs Java)."""
    text = _PUNCTUATION.sub(" ", text.lower()).replace("'", " '")
    return text.split()


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    counts: Counter = Counter()
    for size in range(1, n + 1):
        for start in range(len(words) - size + 1):
            counts[tuple(words[start:start + size])] += 1
    return counts


def _check_caption_inputs(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> List[str]:
    keys = list(hypotheses)
    if not keys:
        raise ValueError("captioning metrics: no hypotheses")
    missing = [k for k in keys if k not in references or not references[k]]
    if missing:
        raise ValueError(f"captioning metrics: no references for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return keys


def bleu(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4) -> List[float]:
    """Corpus-level BLEU-1..n (fractions in [0, 1]) with the "closest reference length" brevity penalty.

    Clipped n-gram matches and candidate/reference lengths are summed over the corpus before the
    geometric mean, as in the COCO caption code (including its tiny smoothing constants, so an n-gram
    order with no match gives ~0 instead of a math error).
    """
    keys = _check_caption_inputs(hypotheses, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guessed = [0] * n
    hyp_len_total = ref_len_total = 0
    for key in keys:
        hyp = normalize_caption(hypotheses[key])
        refs = [normalize_caption(r) for r in references[key]]
        hyp_counts = _ngram_counts(hyp, n)
        max_ref_counts: Dict[tuple, int] = defaultdict(int)
        for ref in refs:
            for gram, count in _ngram_counts(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts[gram], count)
        for gram, count in hyp_counts.items():
            correct[len(gram) - 1] += min(count, max_ref_counts.get(gram, 0))
        for size in range(1, n + 1):
            guessed[size - 1] += max(len(hyp) - size + 1, 0)
        hyp_len_total += len(hyp)
        # closest reference length; on a tie the shorter reference wins
        ref_len_total += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    scores = []
    product = 1.0
    for size in range(n):
        product *= (correct[size] + tiny) / (guessed[size] + small)
        scores.append(product ** (1.0 / (size + 1)))
    ratio = (hyp_len_total + tiny) / (ref_len_total + small)
    if ratio < 1.0:
        scores = [s * math.exp(1.0 - 1.0 / ratio) for s in scores]
    return scores


def cider_d(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> Tuple[float, Dict[str, float]]:
    """CIDEr-D of a set of captions: (corpus score, per-key scores).

    Document frequencies come from the references of the evaluated set (as in the COCO caption code);
    each n-gram order's tf-idf vectors are compared by cosine with the candidate's weights clipped at
    the reference's, scaled by a Gaussian length penalty, averaged over orders and references, x10.
    The length in the penalty is the number of bigrams, reproducing the reference implementation
    exactly (published numbers were produced with it).
    """
    keys = _check_caption_inputs(hypotheses, references)
    hyp_counts = {k: _ngram_counts(normalize_caption(hypotheses[k]), n) for k in keys}
    ref_counts = {k: [_ngram_counts(normalize_caption(r), n) for r in references[k]] for k in keys}
    document_frequency: Counter = Counter()
    for refs in ref_counts.values():
        document_frequency.update({gram for ref in refs for gram in ref})
    log_num_docs = math.log(float(len(keys)))

    def tfidf(counts: Counter) -> Tuple[List[Dict[tuple, float]], List[float], int]:
        vectors: List[Dict[tuple, float]] = [dict() for _ in range(n)]
        norms = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_num_docs - math.log(max(1.0, document_frequency[gram])))
            vectors[order][gram] = weight
            norms[order] += weight * weight
            if order == 1:
                length += tf
        return vectors, [math.sqrt(v) for v in norms], length

    per_key: Dict[str, float] = {}
    for key in keys:
        hyp_vec, hyp_norm, hyp_len = tfidf(hyp_counts[key])
        total = [0.0] * n
        for ref in ref_counts[key]:
            ref_vec, ref_norm, ref_len = tfidf(ref)
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2.0 * sigma ** 2))
            for order in range(n):
                dot = sum(min(w, ref_vec[order].get(g, 0.0)) * ref_vec[order].get(g, 0.0)
                          for g, w in hyp_vec[order].items())
                if hyp_norm[order] != 0 and ref_norm[order] != 0:
                    dot /= hyp_norm[order] * ref_norm[order]
                total[order] += dot * penalty
        per_key[key] = 10.0 * (sum(total) / n) / len(ref_counts[key])
    return sum(per_key.values()) / len(per_key), per_key


def caption_metrics(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Dict[str, float]:
    """CIDEr (CIDEr-D) and BLEU-1..4, in percent like the papers report them."""
    bleu_scores = bleu(hypotheses, references, 4)
    cider, _ = cider_d(hypotheses, references)
    out = {f"BLEU-{i + 1}": 100.0 * s for i, s in enumerate(bleu_scores)}
    out["CIDEr"] = 100.0 * cider
    return out
