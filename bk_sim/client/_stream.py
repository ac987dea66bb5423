"""Large uploads from disk without holding them in memory (issue 17).

A 400 MB upload used to cost the client three copies (the file read, the decoded check,
the multipart body). Above ``STREAM_THRESHOLD`` the client instead hashes the file in a
streaming pass, checks it member by member (``bk_sim.npzstream``), and sends a multipart
body read from the file 1 MiB at a time (``MultipartFileBody``: a sized iterable, so
requests sends a ``Content-Length`` and a retry sends it again from the start).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bk_sim.analytics import PAYLOAD_KIND_FEDERATED_LEARNING
from bk_sim.errors import WeightsFormatError
from bk_sim.npzstream import iter_member_chunks, read_members

#: Files above this size are checked and sent streaming; smaller ones as before.
STREAM_THRESHOLD = 8 * 2**20
_BLOCK = 2**20
_LAYER_RE = re.compile(r"^layer_(0|[1-9][0-9]*)$")


class MultipartFileBody:
    """``prefix + <file> + suffix`` as a sized iterable of 1 MiB blocks.

    requests sends an iterable with a length with a ``Content-Length`` and urllib3 writes
    each block as it comes (a file object would be read 16 KiB at a time); every
    iteration starts from the top, so a retry sends the whole body again.
    """

    def __init__(self, prefix: bytes, path: Path, suffix: bytes) -> None:
        self._prefix = prefix
        self._suffix = suffix
        self._path = path
        self._file_size = path.stat().st_size

    def __len__(self) -> int:
        return len(self._prefix) + self._file_size + len(self._suffix)

    def __iter__(self) -> Iterator[bytes]:
        yield self._prefix
        left = self._file_size
        with open(self._path, "rb") as f:
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    raise OSError(f"{self._path} shrank while it was being sent")
                left -= len(block)
                yield block
        yield self._suffix

    def close(self) -> None:
        """Nothing stays open between iterations; kept for symmetry with file bodies."""


def multipart_file_body(form: str, path: Path) -> tuple[MultipartFileBody, str]:
    """The upload's ``data`` + ``file`` multipart body, streaming, and its content type."""
    boundary = uuid.uuid4().hex
    prefix = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\n{form}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    ).encode()
    suffix = f"\r\n--{boundary}--\r\n".encode()
    return MultipartFileBody(prefix, path, suffix), f"multipart/form-data; boundary={boundary}"


def check_weights_file(path: Path) -> str | None:
    """The learning-kind client check of a large file, member by member.

    Returns ``"federated_learning"`` when the archive passes, None when it is not a weights archive
    (the caller then checks it whole, e.g. analytics); raises ``WeightsFormatError``.
    """
    where = str(path)
    with open(path, "rb") as f:
        members = read_members(f, where)
        layers = [k for k in members if _LAYER_RE.match(k)]
        if not layers or "weighting" not in members:
            return None
        expected = [f"layer_{i}" for i in range(len(layers))]
        if sorted(layers, key=lambda k: int(k[6:])) != expected:
            raise WeightsFormatError(f"{where}: layer indices must run from 0 without gaps")
        extra = sorted(set(members) - set(layers) - {"weighting"})
        if extra:
            raise WeightsFormatError(f"{where}: unexpected arrays in archive: {', '.join(extra)}")
        w = members["weighting"]
        if math.prod(w.shape) != 1 or w.dtype.kind not in "biuf":
            raise WeightsFormatError(f"{where}: weighting must hold exactly one number")
        value = float(np.concatenate(list(iter_member_chunks(f, w, where)))[0])
        if not (math.isfinite(value) and value > 0):
            raise WeightsFormatError(f"{where}: weighting must be finite and > 0, got {value!r}")
        for key in expected:
            m = members[key]
            if m.dtype.kind not in "biuf":
                raise WeightsFormatError(f"{where}: {key} has dtype {m.dtype}; must be numeric")
            for chunk in iter_member_chunks(f, m, where):
                if m.dtype.kind == "f" and not np.isfinite(chunk).all():
                    raise WeightsFormatError(f"{where}: {key} holds NaN or infinite values")
    return PAYLOAD_KIND_FEDERATED_LEARNING
