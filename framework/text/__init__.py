"""The text stage: sources -> documents -> train/held-out split -> fixed-length token contexts."""

from framework.text.contexts import (
    count_contexts,
    iter_chosen_context_batches,
    iter_context_batches,
    iter_contexts,
    load_contexts,
    token_stream,
)
from framework.text.sources import Document, TextSourceError, iter_documents, stdlib_identity
from framework.text.split import SPLITS, iter_split, split_of

__all__ = [
    "Document", "TextSourceError", "iter_documents", "stdlib_identity", "SPLITS", "iter_split", "split_of",
    "iter_contexts", "iter_context_batches", "iter_chosen_context_batches", "load_contexts", "count_contexts", "token_stream",
]
