"""Train / held-out split by document, decided by a hash of the document id.

Splitting by document (not by token or context) keeps held-out text truly unseen: no context of
a held-out file ever shares a file with training data. Hashing the id with the seed, rather
than drawing random numbers in order, makes each document's side independent of every other
document: capping `max_documents` or adding files never moves an existing document across.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from framework.config import TextConfig
from framework.text.sources import Document, iter_documents

SPLITS = ("train", "heldout")


def split_of(doc_id: str, cfg: TextConfig) -> str:
    digest = hashlib.sha256(f"{cfg.seed}:{doc_id}".encode()).digest()
    unit = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    return "heldout" if unit < cfg.heldout_fraction else "train"


def iter_split(cfg: TextConfig, split: str) -> Iterator[Document]:
    """The documents of one split, in source order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return (doc for doc in iter_documents(cfg) if split_of(doc.doc_id, cfg) == split)
