"""Typed settings of the leaf client (PROTOCOL.md sections 1, 5 and 6).

Defaults are the published client's. All are frozen dataclasses: a client's settings do
not change under it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from bk_sim.errors import ClientConfigError

DEFAULT_HOST = "https://app.branchkey.com"
DEFAULT_OUTPUT_DIR = "./aggregated_output"
#: The published client's name for the default download folder (branchkey 2.9.0).
AGGREGATED_OUTPUT_DIR = DEFAULT_OUTPUT_DIR


@dataclass(frozen=True)
class Credentials:
    """A leaf's six credential strings; ``session_token`` is a secret and never shown.

    Field order is the published client's, so ``Credentials(id, name, token, tree,
    branch, owner)`` means the same thing on both.
    """

    id: str
    name: str
    session_token: str = field(repr=False)
    tree_id: str
    branch_id: str
    owner_id: str

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, str) or not value:
                raise ClientConfigError(
                    f"credentials.{f.name} must be a non-empty string, got {value!r}"
                    if f.name != "session_token"
                    else "credentials.session_token must be a non-empty string"
                )
        for name in ("id", "session_token"):
            # Both go into the Authorization header, where requests refuses a line break
            # and quotes the whole header value (the token) in its error.
            if any(c in getattr(self, name) for c in "\r\n"):
                raise ClientConfigError(
                    f"credentials.{name} must not contain a line break (a stray newline "
                    "from the file it was read from?)"
                )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Credentials:
        """Build from the dict form of the seed README; names missing or unknown keys."""
        if not isinstance(data, Mapping):
            raise ClientConfigError(f"credentials must be a mapping, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ClientConfigError(f"credentials are missing: {', '.join(missing)}")
        return cls(**{n: data[n] for n in names})

    def to_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class APIConfig:
    """Where the platform's HTTP API is and how to reach it."""

    host: str = DEFAULT_HOST
    ssl: bool = True
    proxies: Mapping[str, str] | None = None


@dataclass(frozen=True)
class RabbitMQConfig:
    """The AMQP notification transport (PROTOCOL.md 4a).

    ``host`` None means the API host's hostname. Reconnect waits are
    ``min(reconnect_backoff_factor ** attempt, reconnect_max_delay)``;
    ``max_reconnect_attempts`` 0 means never give up.
    """

    host: str | None = None
    port: int = 5671
    ssl: bool = True
    max_reconnect_attempts: int = 10
    reconnect_backoff_factor: float = 2.0
    reconnect_max_delay: float = 60.0
    heartbeat: int = 30


@dataclass(frozen=True)
class WebSocketConfig:
    """The WebSocket notification transport (PROTOCOL.md 4b); same backoff rule as AMQP."""

    max_reconnect_attempts: int = 10
    reconnect_backoff_factor: float = 2.0
    reconnect_max_delay: float = 60.0
    open_timeout: float = 10.0


@dataclass(frozen=True)
class RunConfig:
    """Whether an upload waits for the run to start, and how often it checks."""

    wait_for_run: bool = False
    check_interval_s: float = 30.0


@dataclass(frozen=True)
class RetryConfig:
    """HTTP retry policy (PROTOCOL.md section 5).

    Unlike urllib3's ``Retry`` (0 s, 2 s, 4 s for factor 1.0), this client waits exactly
    the documented ``backoff_factor * 2 ** (n - 1)`` before retry n: 1 s, 2 s, 4 s.
    ``Retry-After`` on 429/503 replaces the computed wait (capped by ``max_backoff``).
    """

    max_retries: int = 3
    backoff_factor: float = 1.0
    total_timeout: float = 30.0
    status_forcelist: tuple[int, ...] = (408, 429, 500, 502, 503, 504)
    allowed_methods: tuple[str, ...] = ("GET", "POST", "PUT")
    max_backoff: float = 120.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ClientConfigError(
                f"retry_config.max_retries must be >= 0, got {self.max_retries}"
            )
        if self.backoff_factor < 0:
            raise ClientConfigError(
                f"retry_config.backoff_factor must be >= 0, got {self.backoff_factor}"
            )
        if self.total_timeout <= 0:
            raise ClientConfigError(
                f"retry_config.total_timeout must be > 0, got {self.total_timeout}"
            )

    def backoff(self, retry_number: int) -> float:
        """Seconds to wait before retry ``retry_number`` (1-based)."""
        return float(min(self.backoff_factor * 2 ** (retry_number - 1), self.max_backoff))

    def get_retry_strategy(self) -> Retry:
        """A urllib3 ``Retry`` for code that brings its own ``requests`` session.

        It waits what ``backoff`` says (1 s, 2 s, 4 s for factor 1.0), not urllib3's
        0 s before the first retry; ``Retry-After`` is honoured as urllib3 does.
        """
        return _DocumentedRetry(
            total=self.max_retries,
            backoff_factor=self.backoff_factor,
            backoff_max=self.max_backoff,
            status_forcelist=self.status_forcelist,
            allowed_methods=self.allowed_methods,
            raise_on_status=False,
        )

    def create_session(self) -> requests.Session:
        """A ``requests.Session`` with ``get_retry_strategy()`` mounted for http and https."""
        session = requests.Session()
        adapter = HTTPAdapter(max_retries=self.get_retry_strategy())
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session


class _DocumentedRetry(Retry):
    """urllib3 ``Retry`` whose wait before retry n is ``factor * 2 ** (n - 1)``, capped."""

    def get_backoff_time(self) -> float:
        # history holds one entry per failed attempt; n is the retry about to happen.
        errors = 0
        for entry in reversed(self.history):
            if entry.redirect_location:
                break
            errors += 1
        if errors == 0:
            return 0.0
        return float(min(self.backoff_factor * 2 ** (errors - 1), self.backoff_max))
