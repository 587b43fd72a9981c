"""Video captioning as masked language modeling (LAVENDER; MSRVTT / MSVD captioning).

Training: the caption `[CLS] w1 .. wn [SEP]` is fed with a fraction `mask_prob` of its positions
1..n+1 (the words and the closing [SEP], which teaches when to stop) replaced by [MASK]; the MLM head
predicts the original tokens there. With `causal: true` (default) a text token attends to every video
token and to the text tokens up to itself only, so what the model learns matches generation, where
the text to the right of the [MASK] does not exist yet.

Generation (`evaluate_step`): `[CLS] [MASK]`, predict the word at [MASK], write it, append a new
[MASK], repeat until [SEP] or `max_gen_len` words (20, as in the papers). Greedy (`beam_size: 1`) or
beam search (`beam_size > 1`, hypotheses ranked by summed log-probability / length**`length_penalty`).
The video is encoded once per clip and reused at every step; only the cross-modal part runs per step.

Metrics: CIDEr (CIDEr-D) and BLEU-1..4 over every evaluated video against all of its references
(`violet_ds.metrics.caption_metrics`). Both head styles use the MLM head (captioning has no other).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from violet_ds.data.datasets import CaptionDataset
from violet_ds.masking.text import IGNORE_INDEX
from violet_ds.metrics import caption_metrics
from violet_ds.registry import TASKS
from violet_ds.tasks.common import DownstreamTask, encode_video, gather_step_outputs


def causal_text_mask(num_video: int, text_mask: torch.Tensor, dtype: torch.dtype, causal: bool = True) -> torch.Tensor:
    """Additive attention mask `(B, 1, Nv+L, Nv+L)` for `cat([video, text])`.

    Video queries see the video only (so video states never depend on the caption being written); text
    query i sees all video tokens and the real text tokens j <= i (j anywhere when not `causal`).
    """
    batch, length = text_mask.shape
    device = text_mask.device
    total = num_video + length
    keep = torch.zeros(batch, total, total, dtype=torch.bool, device=device)
    keep[:, :, :num_video] = True
    text_keep = text_mask.bool()[:, None, :].expand(batch, length, length)
    if causal:
        text_keep = text_keep & torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]
    keep[:, num_video:, num_video:] = text_keep
    return (~keep)[:, None].to(dtype) * torch.finfo(dtype).min


@TASKS.register("caption")
class Captioning(DownstreamTask):
    """MLM captioning with greedy / beam [MASK] decoding."""

    task_token_name = "cap"

    option_defaults: Dict[str, Any] = {
        "mask_prob": 0.5,        # fraction of caption positions (words + closing [SEP]) masked in training
        "causal": True,          # text attends left-to-right (matches generation)
        "max_gen_len": 20,       # words generated at most
        "beam_size": 1,          # 1 = greedy
        "length_penalty": 1.0,   # beam ranking: sum log p / length**length_penalty
    }

    dataset_class = CaptionDataset

    def build(self) -> None:
        super().build()
        cfg, tokenizer = self.cfg, self.tokenizer
        if not 0.0 < float(self.options["mask_prob"]) <= 1.0:
            raise ValueError(f"task {cfg.name!r}: options.mask_prob must be in (0, 1], got {self.options['mask_prob']}")
        if int(self.options["beam_size"]) < 1 or int(self.options["max_gen_len"]) < 1:
            raise ValueError(f"task {cfg.name!r}: options.beam_size and max_gen_len must be >= 1")
        self.heads["mlm"] = self._mlm_head()
        vocab = self.heads["mlm"].bias.numel()
        banned = torch.zeros(vocab, dtype=torch.bool)
        # never generated: special tokens other than [SEP] (the end), and rows beyond the tokenizer
        for token in tokenizer.special_ids:
            if token != tokenizer.sep_id and token < vocab:
                banned[token] = True
        banned[tokenizer.vocab_size:] = True
        self.register_buffer("banned_tokens", banned, persistent=False)

    # ------------------------------------------------------------------------------- model calls
    def _text_logits(self, video_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-modal pass with the caption attention mask -> text hidden states `(B, L, D)`."""
        text = self.model.embed_text(ids).to(video_tokens.dtype)
        task_vector = self.task_vector()
        if task_vector is not None:
            # LAVENDER's "cap" token sits between video and text and, like the video, is visible to every
            # text position (its own query sees only video and itself)
            token = task_vector.to(video_tokens.dtype).view(1, 1, -1).expand(video_tokens.shape[0], 1, -1)
            video_tokens = torch.cat([video_tokens, token], dim=1)
        hidden = torch.cat([video_tokens, text], dim=1)
        attention = causal_text_mask(video_tokens.shape[1], mask, hidden.dtype, bool(self.options["causal"]))
        return self.model.cross_encoder(hidden, attention)[:, video_tokens.shape[1]:]

    def mask_caption(self, ids: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(masked ids, labels with IGNORE_INDEX outside the masked positions); >= 1 position per row."""
        candidates = mask.bool().clone()
        candidates[:, 0] = False  # [CLS]
        draw = torch.rand(ids.shape, device=ids.device)
        chosen = candidates & (draw < float(self.options["mask_prob"]))
        # rows that drew nothing mask their best-drawn candidate, so every row teaches something
        fallback = draw.masked_fill(~candidates, 2.0).argmin(dim=1)
        none = ~chosen.any(dim=1) & candidates.any(dim=1)
        chosen[none, fallback[none]] = True
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        return torch.where(chosen, torch.full_like(ids, self.special.mask), ids), labels

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        video_tokens, _ = encode_video(self.model, batch["video"])
        device = video_tokens.device
        ids, mask = batch["caption_ids"].to(device), batch["caption_mask"].to(device)
        masked, labels = self.mask_caption(ids, mask)
        hidden = self._text_logits(video_tokens, masked, mask)
        chosen = labels != IGNORE_INDEX
        logits = self.heads["mlm"](hidden[chosen]).float()
        loss = F.cross_entropy(logits, labels[chosen])
        acc = (logits.argmax(dim=1) == labels[chosen]).float().mean()
        return {"loss": loss, "acc_masked": acc.detach()}

    # --------------------------------------------------------------------------------- decoding
    def _step_logprobs(self, video_tokens: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
        """Log-probabilities `(N, V)` of the word at position `length` (which holds [MASK])."""
        mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] <= length).long().expand_as(ids)
        hidden = self._text_logits(video_tokens, ids, mask)[:, length]
        logits = self.heads["mlm"](hidden).float().masked_fill(self.banned_tokens[None, :], float("-inf"))
        return logits.log_softmax(dim=-1)

    @torch.no_grad()
    def generate(self, video: torch.Tensor) -> List[List[int]]:
        """Generated token ids per video (without [CLS] / [SEP])."""
        video_tokens, _ = encode_video(self.model, video)
        beam = int(self.options["beam_size"])
        if beam == 1:
            return self._greedy(video_tokens)
        return self._beam(video_tokens, beam)

    def _new_ids(self, rows: int, device) -> torch.Tensor:
        length = int(self.options["max_gen_len"]) + 2
        ids = torch.full((rows, length), self.special.pad, dtype=torch.long, device=device)
        ids[:, 0] = self.special.cls
        return ids

    def _greedy(self, video_tokens: torch.Tensor) -> List[List[int]]:
        rows, device = video_tokens.shape[0], video_tokens.device
        ids = self._new_ids(rows, device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        max_len = int(self.options["max_gen_len"])
        for position in range(1, max_len + 2):
            ids[:, position] = self.special.mask
            logprobs = self._step_logprobs(video_tokens, ids, position)
            if position == max_len + 1:
                word = torch.full((rows,), self.special.sep, dtype=torch.long, device=device)
            else:
                word = logprobs.argmax(dim=-1)
            ids[:, position] = torch.where(done, torch.full_like(word, self.special.pad), word)
            done |= word == self.special.sep
            if bool(done.all()):
                break
        return self._strip(ids)

    def _beam(self, video_tokens: torch.Tensor, beam: int) -> List[List[int]]:
        batch, device = video_tokens.shape[0], video_tokens.device
        video_tokens = video_tokens.repeat_interleave(beam, dim=0)
        ids = self._new_ids(batch * beam, device)
        scores = torch.full((batch, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # one live hypothesis at the start: the beams would be copies otherwise
        lengths = torch.zeros(batch, beam, device=device)
        done = torch.zeros(batch, beam, dtype=torch.bool, device=device)
        max_len = int(self.options["max_gen_len"])
        for position in range(1, max_len + 2):
            ids[:, position] = self.special.mask
            logprobs = self._step_logprobs(video_tokens, ids, position)
            vocab = logprobs.shape[-1]
            if position == max_len + 1:
                # the length limit: every live hypothesis ends here
                logprobs = torch.full_like(logprobs, float("-inf"))
                logprobs[:, self.special.sep] = 0.0
            # a finished hypothesis only extends with [PAD] at no cost
            frozen = torch.full_like(logprobs, float("-inf"))
            frozen[:, self.special.pad] = 0.0
            logprobs = torch.where(done.view(-1, 1), frozen, logprobs)
            total = (scores.view(-1, 1) + logprobs).view(batch, beam * vocab)
            best, flat = total.topk(beam, dim=1)
            source = flat // vocab
            word = flat % vocab
            rows = (torch.arange(batch, device=device)[:, None] * beam + source).view(-1)
            ids = ids[rows]
            done = done.gather(1, source)
            lengths = lengths.gather(1, source) + (~done).float()
            ids[:, position] = word.view(-1)
            scores = best
            done = done | (word == self.special.sep)
            if bool(done.all()):
                break
        ranked = scores / lengths.clamp(min=1.0).pow(float(self.options["length_penalty"]))
        winner = ranked.argmax(dim=1)
        chosen = ids.view(batch, beam, -1)[torch.arange(batch, device=device), winner]
        return self._strip(chosen)

    def _strip(self, ids: torch.Tensor) -> List[List[int]]:
        out = []
        for row in ids[:, 1:].tolist():
            words = []
            for token in row:
                if token in (self.special.sep, self.special.pad, self.special.mask):
                    break
                words.append(token)
            out.append(words)
        return out

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate_step(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        generated = self.generate(batch["video"])
        texts = [self.tokenizer.decode(tokens) for tokens in generated]
        size = len(texts)
        return {"index": batch["index"].cpu(), "hypothesis": texts,
                "references": list(batch.get("captions", [[]] * size)),
                "video_id": list(batch.get("video_id", [""] * size))}

    def evaluate_end(self, outputs: List[Dict[str, Any]], world) -> Dict[str, float]:
        merged = gather_step_outputs(outputs, world)
        hypotheses = {str(i): h for i, h in zip(merged["index"].tolist(), merged["hypothesis"])}
        references = {str(i): list(r) for i, r in zip(merged["index"].tolist(), merged["references"])}
        self.last_predictions = [{"index": int(i), "video": v, "caption": h, "references": list(r)}
                                 for i, v, h, r in zip(merged["index"].tolist(), merged["video_id"],
                                                       merged["hypothesis"], merged["references"])]
        metrics = caption_metrics(hypotheses, references)
        metrics["num_videos"] = float(len(hypotheses))
        return metrics
