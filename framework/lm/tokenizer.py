"""The built-in LM's tokenizer: a byte-level BPE trained on the corpus's training split.

Byte-level BPE never meets an unknown character (every byte is in the base alphabet), so any
text the framework later shows a feature on round-trips exactly. Training only on the train
split keeps the held-out documents unseen by every learned part of the pipeline. The Rust
trainer of `tokenizers` reads the ~13 MB stdlib corpus in seconds.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from framework.config import TextConfig
from framework.lm.base import Tokenizer
from framework.text.sources import TextSourceError
from framework.text.split import iter_split

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(cfg: TextConfig, vocab_size: int) -> Tokenizer:
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    counted = _CountingIterator(doc.text for doc in iter_split(cfg, "train"))
    tokenizer.train_from_iterator(counted, trainer=trainer)
    if counted.count == 0:
        raise TextSourceError(
            f"text.source {cfg.source!r} has no training documents to train a tokenizer on; "
            f"check the source, text.max_documents and text.heldout_fraction"
        )
    return Tokenizer(tokenizer)


class _CountingIterator:
    """Passes items through and counts them: the trainer accepts an empty corpus silently."""

    def __init__(self, items):
        self._items = iter(items)
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._items)
        self.count += 1
        return item


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    tokenizer.hf.save(str(path))


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer(HFTokenizer.from_file(str(path)))
