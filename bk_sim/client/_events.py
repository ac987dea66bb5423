"""Instrumentation events: what the client tells its observer (DESIGN.md).

One small frozen dataclass for every kind, so an event log, a Locust listener and a test
all read the same fields. Unused fields stay ``None``. Events never carry secrets: no
session token, no Authorization header.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

_log = logging.getLogger("bk_sim.client")

EventKind = Literal[
    "http_request",  # one HTTP attempt finished (status or error)
    "retry_wait",  # about to sleep before an HTTP retry
    "run_wait",  # upload waiting for the run to start (wait_for_run)
    "connect",  # a notification transport connected (first time or after a loss)
    "disconnect",  # a notification transport lost its connection or channel
    "reconnect_wait",  # about to sleep before reconnect attempt n
    "connect_failed",  # one connect attempt failed
    "give_up",  # the consumer stopped reconnecting (attempts exhausted or fatal)
    "notification",  # a notification message was received and handled
    "consumer_stopped",  # the consumer ended because the client closed
]


@dataclass(frozen=True)
class ClientEvent:
    """One thing the client did or saw; ``t`` is ``time.time()`` when it happened."""

    kind: EventKind
    leaf_id: str
    t: float = dataclasses.field(default_factory=time.time)
    transport: str | None = None  # "http", "amqp" or "websocket"
    method: str | None = None
    endpoint: str | None = None  # a route name such as "upload", not the full URL
    status: int | None = None
    duration_s: float | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    attempt: int | None = None
    delay_s: float | None = None
    error: str | None = None
    message_type: str | None = None
    value: str | None = None  # aggregation id or run status carried by a notification

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class Observer(Protocol):
    """Anything with ``on_event``; it must be quick and must not raise."""

    def on_event(self, event: ClientEvent) -> None: ...


class EventSink:
    """Delivers events to an optional observer; an observer's exception is logged, not raised."""

    def __init__(self, observer: Observer | None, leaf_id: str) -> None:
        self._observer = observer
        self.leaf_id = leaf_id

    def emit(self, kind: EventKind, **fields: Any) -> None:
        if self._observer is None:
            return
        try:
            self._observer.on_event(ClientEvent(kind=kind, leaf_id=self.leaf_id, **fields))
        except Exception:  # noqa: BLE001 - an observer must never break the client
            _log.exception("observer failed on %s event", kind)
