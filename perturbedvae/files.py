"""Digests of files, one way for every layer (datasets, checkpoints, encoder weights, embedding caches).

A core helper: it imports nothing of the package, so data, encoders and training may all use it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB blocks (a multi-GB checkpoint never sits in memory)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
