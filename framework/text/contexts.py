"""Packing a split's documents into fixed-length token contexts with stable ids.

Documents are tokenised in batches (the Rust tokenizers use every core), joined with the EOS
id between them, and cut into consecutive chunks of `context_length`; context `i` is tokens
`[i * L, (i + 1) * L)` of that stream, and the trailing partial chunk is dropped. Because the
document order and the split are deterministic, (context id, position) names one token on every
machine, which is how harvested activations point back at their text.

The token stream of each (source, split, tokenizer) is kept in memory for the life of the
process and grown only as far as a request needs: asking for contexts 0..99 of a large corpus
tokenises a few documents, not the whole corpus, and a second pass over the same split is free.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from framework.config import TextConfig
from framework.lm.base import Tokenizer
from framework.text.sources import TextSourceError
from framework.text.split import iter_split

DOCS_PER_BATCH = 256  # documents tokenised together by one `encode_batch`


class TokenStream:
    """The token ids of one split, grown on demand; ids stored as int32 to halve memory."""

    def __init__(self, cfg: TextConfig, tokenizer: Tokenizer, split: str):
        self._docs = iter_split(cfg, split)
        self._tokenizer = tokenizer
        self._eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
        self._tokens = np.empty(0, dtype=np.int32)  # (n_tokens,)
        self.n_documents = 0
        self.exhausted = False
        self.failed = False  # a read raised: documents may be lost, so the stream is never used again
        self.description = f"split {split!r} of text.source {cfg.source!r}"

    def tokens(self, n: int | None = None) -> np.ndarray:
        """At least the first `n` tokens (fewer only if the split is shorter); all if None."""
        target = None if n is None else max(n, 2 * len(self._tokens))  # grow geometrically
        if not self.exhausted and (n is None or len(self._tokens) < n):
            try:
                self._grow(target)
            except BaseException:
                # Documents pulled from the source before the error are gone from it: continuing
                # would shift every later context id (or end the split early). `token_stream`
                # starts a new stream from the first document instead.
                self.failed = True
                raise
        return self._tokens

    def _grow(self, target: int | None) -> None:
        pieces = [self._tokens]
        total = len(self._tokens)
        while target is None or total < target:
            batch = [doc.text for _, doc in zip(range(DOCS_PER_BATCH), self._docs)]
            if not batch:
                self.exhausted = True
                break
            for ids in self._tokenizer.encode_batch(batch):
                pieces.append(np.asarray(ids + self._eos, dtype=np.int32))
                total += len(pieces[-1])
            self.n_documents += len(batch)
        self._tokens = np.concatenate(pieces)
        if self.exhausted and self.n_documents == 0:
            raise TextSourceError(
                f"{self.description} has no documents; check the source, text.max_documents and "
                f"text.heldout_fraction (a tiny corpus may put no document in the held-out split)"
            )


_STREAMS: dict[tuple, TokenStream] = {}


def token_stream(cfg: TextConfig, tokenizer: Tokenizer, split: str) -> TokenStream:
    """The process-wide stream for this split; context_length is not part of the key."""
    key = (
        cfg.source, cfg.text_field, cfg.hf_split, cfg.heldout_fraction, cfg.max_documents,
        cfg.seed, split, tokenizer.fingerprint,
    )
    if key not in _STREAMS or _STREAMS[key].failed:
        _STREAMS[key] = TokenStream(cfg, tokenizer, split)
    return _STREAMS[key]


def _require_one_context(stream: TokenStream, context_length: int) -> None:
    n = len(stream.tokens(context_length))
    if n < context_length:
        raise TextSourceError(
            f"{stream.description} has only {n} tokens, fewer than one context of "
            f"text.context_length={context_length}; use a larger corpus or a shorter context"
        )


def iter_context_batches(
    cfg: TextConfig, tokenizer: Tokenizer, split: str, batch_size: int, start: int = 0, stop: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(context ids (b,), tokens (b, context_length)) for ids start..stop; the last batch may be short."""
    length = cfg.context_length
    stream = token_stream(cfg, tokenizer, split)
    _require_one_context(stream, length)
    first = start
    while stop is None or first < stop:
        last = first + batch_size if stop is None else min(first + batch_size, stop)
        tokens = stream.tokens(last * length)
        last = min(last, len(tokens) // length)
        if last <= first:
            return
        ids = torch.arange(first, last)  # (b,)
        block = torch.from_numpy(tokens[first * length : last * length].astype(np.int64))
        yield ids, block.view(last - first, length)  # (b, context_length)
        first = last


def iter_chosen_context_batches(
    cfg: TextConfig, tokenizer: Tokenizer, split: str, ids: torch.Tensor, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(context ids (b,), tokens (b, context_length)) for the given ids, in their order; the last
    batch may be short. For contexts scattered over the split (a harvest's shuffled windows)."""
    length = cfg.context_length
    stream = token_stream(cfg, tokenizer, split)
    _require_one_context(stream, length)
    if len(ids) == 0:
        return
    highest = int(ids.max())
    tokens = stream.tokens((highest + 1) * length)
    n = len(tokens) // length
    if highest >= n:
        raise TextSourceError(f"{stream.description} has {n} contexts of {length} tokens; context {highest} "
                              f"was asked for. The text source changed: use a fixed corpus")
    contexts = tokens[: n * length].reshape(n, length)
    for first in range(0, len(ids), batch_size):
        chosen = ids[first : first + batch_size]
        yield chosen, torch.from_numpy(contexts[chosen.numpy()].astype(np.int64))  # (b, context_length)


def iter_contexts(
    cfg: TextConfig, tokenizer: Tokenizer, split: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """(context id, tokens (context_length,)) for ids start..stop (to the end if stop is None)."""
    for ids, tokens in iter_context_batches(cfg, tokenizer, split, 64, start, stop):
        yield from zip(ids.tolist(), tokens)


def load_contexts(
    cfg: TextConfig, tokenizer: Tokenizer, split: str, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Contexts start..stop as one (n, context_length) tensor; for small corpora and slices."""
    length = cfg.context_length
    stop = count_contexts(cfg, tokenizer, split) if stop is None else stop
    batches = [tokens for _, tokens in iter_context_batches(cfg, tokenizer, split, max(stop - start, 1), start, stop)]
    return torch.cat(batches) if batches else torch.empty(0, length, dtype=torch.long)


def count_contexts(cfg: TextConfig, tokenizer: Tokenizer, split: str) -> int:
    """Full contexts in the split; tokenises the whole split the first time."""
    stream = token_stream(cfg, tokenizer, split)
    _require_one_context(stream, cfg.context_length)
    return len(stream.tokens()) // cfg.context_length
