"""The platform's resource limits: time, connections, bytes in flight, metrics quotas.

One frozen ``Limits`` travels inside ``PlatformConfig``; ``limit_options`` adds one
``platform serve`` flag per field (and ``BK_SIM_<FIELD>`` from the environment), and
``start_platform(limits=...)`` passes the same values to a child platform. Each default
is what docs/platform-hardening.md states the worst-case memory for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from bk_sim.errors import PlatformError


@dataclass(frozen=True)
class Limits:
    """Every bound the platform enforces besides the upload size limits."""

    #: A request's headers must arrive within this many seconds of its first byte (or
    #: of the connection opening): a slowloris connection is closed after it.
    header_timeout_s: float = 10.0
    #: A request body that stalls (no byte while the platform waits for one) this long
    #: is cut off.
    body_timeout_s: float = 30.0
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout_s: float = 15.0
    #: Open connections at most; at the cap a new one replaces the connection that has
    #: waited longest for its headers, or is closed when every connection is busy.
    max_connections: int = 2048
    #: Request-body bytes held in memory at once, across all connections: a JSON body
    #: reserves its size (its declared size, else ``max_json_bytes``), an upload its
    #: streaming buffer (``UPLOAD_BUFFER_BYTES``; the upload itself goes to disk).
    max_inflight_bytes: int = 64 * 2**20
    #: How long a request waits for room under ``max_inflight_bytes`` before a 503.
    inflight_wait_s: float = 10.0
    #: Uploads validated at once (each streams with a bounded buffer).
    validation_workers: int = 4
    #: Metrics rows a leaf may keep (429 beyond) and bytes of metrics it may keep (413).
    max_metrics_per_leaf: int = 10_000
    max_metrics_bytes_per_leaf: int = 16 * 2**20
    #: Largest JSON body (admin, metrics).
    max_json_bytes: int = 4 * 2**20
    #: Default and largest page of an admin listing.
    page_size: int = 100
    max_page_size: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlatformError(f"limit {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise PlatformError(f"limit {f.name} must be > 0, got {value!r}")
        if self.page_size > self.max_page_size:
            raise PlatformError("limit page_size must not exceed max_page_size")

    def as_args(self) -> list[str]:
        """The ``platform serve`` flags that reproduce these limits (non-defaults only)."""
        default = Limits()
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out += [_flag(f.name), str(value)]
        return out


def _flag(name: str) -> str:
    """``header_timeout_s`` -> ``--header-timeout``."""
    return "--" + name.removesuffix("_s").replace("_", "-")


def limit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Click decorator: one option per ``Limits`` field, passed on as ``limits=Limits``."""
    names = [f.name for f in dataclasses.fields(Limits)]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names}
        try:
            kwargs["limits"] = Limits(**values)
        except PlatformError as exc:
            raise click.UsageError(str(exc)) from exc
        return fn(*args, **kwargs)

    default = Limits()
    for f in reversed(dataclasses.fields(Limits)):
        value = getattr(default, f.name)
        wrapper = click.option(
            _flag(f.name),
            f.name,
            envvar=f"BK_SIM_{f.name.upper()}",
            type=float if isinstance(value, float) else int,
            default=value,
            show_default=True,
            show_envvar=True,
            help=_HELP[f.name],
        )(wrapper)
    return wrapper


_HELP = {
    "header_timeout_s": "Seconds a request may take to send its headers (slowloris guard).",
    "body_timeout_s": "Seconds a request body may stall before the connection is cut.",
    "keepalive_timeout_s": "Seconds an idle keep-alive connection stays open.",
    "max_connections": "Open connections at most (oldest header-pending one is evicted).",
    "max_inflight_bytes": "Request-body bytes held in memory across connections (503 beyond).",
    "inflight_wait_s": "Seconds a request waits for room under --max-inflight-bytes.",
    "validation_workers": "Uploads validated at once (each streams with a bounded buffer).",
    "max_metrics_per_leaf": "Metrics rows a leaf may store (429 beyond).",
    "max_metrics_bytes_per_leaf": "Metrics bytes a leaf may store (413 beyond).",
    "max_json_bytes": "Largest JSON request body (413 beyond).",
    "page_size": "Default page size of admin listings.",
    "max_page_size": "Largest page size of admin listings.",
}


#: What one upload streaming to disk holds in memory (read chunk, write block, aiohttp's
#: buffer), and so reserves under ``max_inflight_bytes``.
UPLOAD_BUFFER_BYTES = 1 * 2**20


class ByteBudget:
    """A platform-wide count of request-body bytes in flight, with a bounded wait."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.used = 0
        self.peak = 0
        self._cond = asyncio.Condition()

    async def acquire(self, size: int) -> int:
        """Reserve ``size`` bytes (capped at the capacity); raises ``BudgetExhausted``."""
        size = min(max(size, 0), self.capacity)
        async with self._cond:
            try:
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self.used + size <= self.capacity), self.wait_s
                )
            except TimeoutError as exc:
                raise BudgetExhausted(self.used, self.capacity) from exc
            self.used += size
            self.peak = max(self.peak, self.used)
        return size

    async def release(self, size: int) -> None:
        if size <= 0:
            return
        async with self._cond:
            self.used -= size
            self._cond.notify_all()


class BudgetExhausted(Exception):
    """No room under ``max_inflight_bytes`` within ``inflight_wait_s``."""

    def __init__(self, used: int, capacity: int) -> None:
        super().__init__(f"{used} of {capacity} request-body bytes in flight")
