"""Receive an upload to disk as it arrives, hashing it on the way; memory is one chunk.

The ``file`` part of the multipart body goes to ``<files>/incoming/<uuid>.part`` in
``WRITE_BYTES`` blocks, each written and hashed in a worker thread (the event loop only
moves bytes), so an upload of any size costs the same memory and the loop keeps
answering. Validation then streams the stored file (``_zipstream``) and the file is
renamed into place: nothing ever holds the whole upload or a decoded member.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from bk_sim.platform._rounds import RequestRejected

MULTIPART_SLACK = 64 * 1024  # form field + multipart framing on top of the file
MAX_FORM_FIELD = 32 * 1024
READ_BYTES = 256 * 1024
WRITE_BYTES = 512 * 1024

Run = Callable[..., Awaitable[Any]]


@dataclass
class Received:
    """An upload on disk: its temporary path, size, SHA-256 and the ``data`` form field."""

    path: Path
    size: int
    sha256: bytes
    form: str | None

    @property
    def digest(self) -> str:
        return "sha256=" + base64.b64encode(self.sha256).decode("ascii")


def check_digest(claimed_digest: str | None, actual: bytes) -> None:
    """400 unless ``x-bk-file-digest`` (when sent) is the SHA-256 of what arrived."""
    if claimed_digest is None:
        return
    claimed = claimed_digest.strip()
    if not claimed.startswith("sha256="):
        raise RequestRejected(400, "x-bk-file-digest must look like sha256=<base64>")
    try:
        raw = base64.b64decode(claimed[len("sha256=") :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestRejected(400, "x-bk-file-digest is not valid base64") from exc
    if not hmac.compare_digest(raw, actual):
        raise RequestRejected(
            400, "x-bk-file-digest does not match the uploaded file (corrupted in transit?)"
        )


class _Sink:
    """The open temporary file and the running hash; blocks go through ``run``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.hash = hashlib.sha256()
        self.size = 0
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, block: bytes) -> None:
        self.hash.update(block)
        self._fh.write(block)

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


async def receive_upload(request: web.Request, *, incoming: Path, limit: int, run: Run) -> Received:
    """Stream the ``file`` part to ``incoming`` (bounded by ``limit``), keep ``data``."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError, LookupError) as exc:
        raise RequestRejected(400, f"upload must be multipart/form-data: {exc}") from exc
    sink: _Sink | None = None
    form: str | None = None
    skipped = 0
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise RequestRejected(400, "nested multipart is not supported")
            if part.name == "file":
                if sink is not None:
                    raise RequestRejected(400, "multipart part 'file' appears twice")
                incoming.mkdir(parents=True, exist_ok=True)
                sink = await run(_Sink, incoming / f"{uuid.uuid4()}.part")
                pending = bytearray()
                while chunk := await part.read_chunk(READ_BYTES):
                    sink.size += len(chunk)
                    if sink.size > limit:
                        raise RequestRejected(
                            413, f"file part is over the upload limit of {limit} bytes"
                        )
                    pending += chunk
                    if len(pending) >= WRITE_BYTES:
                        await run(sink.write, bytes(pending))
                        pending.clear()
                if pending:
                    await run(sink.write, bytes(pending))
            elif part.name == "data":
                raw = bytearray()
                while chunk := await part.read_chunk(READ_BYTES):
                    raw.extend(chunk)
                    if len(raw) > MAX_FORM_FIELD:
                        raise RequestRejected(413, "form field 'data' is over 32 KiB")
                form = raw.decode("utf-8", errors="replace")
            else:  # drained, but counted: a chunked body has no Content-Length to check
                while chunk := await part.read_chunk(READ_BYTES):
                    skipped += len(chunk)
                    if skipped > MULTIPART_SLACK:
                        raise RequestRejected(
                            413,
                            f"form parts other than 'file' and 'data' are over "
                            f"{MULTIPART_SLACK // 1024} KiB",
                        )
        if sink is None:
            raise RequestRejected(400, "multipart part 'file' is missing")
        if sink.size == 0:
            raise RequestRejected(400, "the uploaded file is empty")
        await run(sink.close)
    except BaseException as exc:
        if sink is not None:
            sink.abort()  # close + unlink: quick, and must happen even when cancelled
        if isinstance(exc, (ValueError, AssertionError, LookupError)):
            raise RequestRejected(400, f"malformed multipart body: {exc}") from exc
        raise
    return Received(sink.path, sink.size, sink.hash.digest(), form)
