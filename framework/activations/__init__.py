"""Activations: harvest (LM -> shards), the shard format, the streaming reader, live mode."""

from framework.activations.format import Manifest, Rows, read_manifest
from framework.activations.reader import ActivationStore, ActivationStream

__all__ = ["ActivationStore", "ActivationStream", "Manifest", "Rows", "read_manifest"]
