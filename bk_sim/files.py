"""Writing a file so that nobody ever reads half of it, in one place.

Results, reports, credentials, uploads and aggregates are all written this way: a unique
temporary file in the same folder (so the rename is atomic and two writers never share a
temporary name), its mode set before the first byte (so a secret is never readable by
others, even for a moment), then renamed over the target. A failed write leaves the old
file, or nothing, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

SECRET_MODE = 0o600


def atomic_write(target: str | Path, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``data`` (str is UTF-8) to ``target`` atomically with ``mode``; returns the path."""
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
