"""The contexts analysis reads, and fetching any one of them again by its id.

Analysis reads held-out text: examples shown on a dashboard should be text no learned part of
the pipeline trained on. When the held-out split is too small for `analyze.n_tokens` (a small
corpus with `text.heldout_fraction` of 5%), it falls back to the training split, logs so and
records the split it used, because context ids only mean something within their split.

Examples are stored as one global token index, `context id * context_length + position`, and
their tokens are looked up again when pages are written: contexts are deterministic
(framework/text/contexts.py), so storing indices costs nothing and a resumed run points at the
same text.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from framework.config import TextConfig
from framework.lm.base import Tokenizer
from framework.text import TextSourceError, iter_context_batches, token_stream

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    text: TextConfig
    tokenizer: Tokenizer
    split: str
    n_contexts: int
    skip_first_tokens: int  # positions never analysed (position 0 sees only itself)

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def batches(self, batch_size: int, first_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(context ids (b,), tokens (b, context_length)) from batch `first_batch` on."""
        yield from iter_context_batches(
            self.text, self.tokenizer, self.split, batch_size, first_batch * batch_size, self.n_contexts
        )

    def n_batches(self, batch_size: int) -> int:
        return math.ceil(self.n_contexts / batch_size)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids at global token indices, `context id * context_length + position`.

        That index is also the token's offset in the split's token stream, which the text stage
        keeps in memory once tokenised, so a lookup is an array index.
        """
        stream = token_stream(self.text, self.tokenizer, self.split).tokens(self.n_contexts * self.context_length)
        return torch.from_numpy(stream[index.cpu().numpy()].astype(np.int64))

    def fetch(self, ids: Sequence[int]) -> torch.Tensor:
        """Tokens (len(ids), context_length) of the given contexts, in the given order."""
        length = self.context_length
        return self.token_ids(torch.tensor(list(ids))[:, None] * length + torch.arange(length))


def analysis_corpus(text: TextConfig, tokenizer: Tokenizer, n_tokens: int, skip_first_tokens: int) -> Corpus:
    """Enough contexts for `n_tokens` analysed tokens, from held-out text when it has them."""
    per_context = text.context_length - skip_first_tokens
    n_contexts = max(1, math.ceil(n_tokens / per_context))
    needed = n_contexts * text.context_length
    available = _available(text, tokenizer, "heldout", needed)
    if available >= needed:
        return Corpus(text, tokenizer, "heldout", n_contexts, skip_first_tokens)
    log.warning(
        "the held-out split has %d tokens, fewer than the %d that analyze.n_tokens=%d needs; "
        "analysing the training split instead (lower analyze.n_tokens or raise "
        "text.heldout_fraction to stay held out)", available, needed, n_tokens,
    )
    available = _available(text, tokenizer, "train", needed)
    return Corpus(text, tokenizer, "train", min(n_contexts, available // text.context_length), skip_first_tokens)


def _available(text: TextConfig, tokenizer: Tokenizer, split: str, needed: int) -> int:
    """Tokens the split holds, up to about `needed` (an empty split holds none)."""
    try:
        return len(token_stream(text, tokenizer, split).tokens(needed))
    except TextSourceError:
        return 0
