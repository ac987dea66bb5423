"""Pre-signed download URLs: ``/files/<file_id>?expires=<unix>&sig=<hex HMAC-SHA256>``.

A download URL needs no auth header (PROTOCOL.md section 2), so it must prove on its own
that the platform issued it and that it is still fresh. The secret lives in the data
directory so URLs stay valid across a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from pathlib import Path

from bk_sim.files import SECRET_MODE, atomic_write

DEFAULT_TTL_S = 300.0
_SECRET_BYTES = 32


def load_or_create_secret(path: Path) -> bytes:
    """The platform's signing secret, created (mode 0600) on first start."""
    if path.is_file():
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    secret = secrets.token_bytes(_SECRET_BYTES)
    atomic_write(path, secret, mode=SECRET_MODE)
    return secret


class UrlSigner:
    """Signs and checks ``(file_id, expires)`` pairs with one secret."""

    def __init__(self, secret: bytes, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def _sig(self, file_id: str, expires: int) -> str:
        msg = f"{file_id}\n{expires}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def query(self, file_id: str, *, now: float | None = None) -> str:
        """The query string (without ``?``) that makes ``/files/<file_id>`` downloadable."""
        expires = int((time.time() if now is None else now) + self.ttl_s)
        return f"expires={expires}&sig={self._sig(file_id, expires)}"

    def verify(self, file_id: str, expires: str, sig: str, *, now: float | None = None) -> bool:
        """True when ``sig`` was made by this platform for this file and has not expired."""
        try:
            exp = int(expires)
        except (TypeError, ValueError):
            return False
        if exp < (time.time() if now is None else now):
            return False
        # bytes, not str: compare_digest raises TypeError for a non-ASCII str (a 500)
        return hmac.compare_digest(self._sig(file_id, exp).encode(), str(sig).encode())
