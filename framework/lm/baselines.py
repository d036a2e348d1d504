"""Count-based baselines that say whether a pretrained LM learned anything beyond frequencies.

A transformer whose held-out loss is not below the unigram's has learned nothing about context;
one below the bigram's uses more than the previous token. Both are fitted on the training split
only and scored on exactly the held-out targets the LM is scored on (tokens 1.. of each context).
"""

from __future__ import annotations

import torch

BIGRAM_PRIOR_WEIGHT = 10.0  # Dirichlet smoothing of the bigram towards the unigram, in tokens


def unigram_log_probs(train_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(token) with add-one smoothing, (vocab,) float64."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    return (counts / counts.sum()).log()


def unigram_loss(train_tokens: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of train-split token frequencies on heldout[:, 1:]."""
    log_probs = unigram_log_probs(train_tokens, vocab_size)
    return -log_probs[heldout[:, 1:]].mean().item()


def bigram_loss(train_tokens: torch.Tensor, heldout: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of p(b | a) = (c(a, b) + w p(b)) / (c(a) + w), w = BIGRAM_PRIOR_WEIGHT.

    Only the pairs that occur in `heldout` are looked up (sorted pair codes + searchsorted), so
    memory stays O(train tokens) even for a 50k-token vocabulary.
    """
    unigram = unigram_log_probs(train_tokens, vocab_size).exp()
    codes, counts = torch.unique(train_tokens[:-1] * vocab_size + train_tokens[1:], return_counts=True)
    context_counts = torch.bincount(train_tokens[:-1], minlength=vocab_size).double()
    prev, target = heldout[:, :-1].flatten(), heldout[:, 1:].flatten()  # (n_pairs,)
    query = prev * vocab_size + target
    where = torch.searchsorted(codes, query).clamp(max=len(codes) - 1)
    pair_counts = torch.where(codes[where] == query, counts[where], 0).double()
    probs = (pair_counts + BIGRAM_PRIOR_WEIGHT * unigram[target]) / (context_counts[prev] + BIGRAM_PRIOR_WEIGHT)
    return -probs.log().mean().item()
