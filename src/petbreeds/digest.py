"""A file's hash, the one way petbreeds computes it: a download's md5 (as params.yaml gives the official archives'),
a weights file's sha256 (as torch hub names them), the files a resume state is keyed by."""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike[str], algorithm: str) -> str:
    """The hex digest of the file at ``path`` by hashlib's ``algorithm`` ("md5", "sha256"), read in chunks by
    hashlib itself."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
