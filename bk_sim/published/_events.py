"""The runner's JSON event lines as frozen dataclasses (one class per ``event`` kind).

The runner (``_runner.py``) writes one JSON object per line with ``event``, ``t`` (unix
time) and ``leaf`` (the harness's leaf key, or null); ``parse_event`` turns a line into
the matching class below. An event kind this version does not know becomes ``Unknown``
with its raw fields, so a newer runner never breaks an older host.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "Bye",
    "ConsumerPhase",
    "ConsumerStopped",
    "Fatal",
    "HttpAttempt",
    "HttpRequest",
    "HttpRetry",
    "HttpRetryWait",
    "LogLine",
    "Notification",
    "NotificationBlocked",
    "NotificationDropped",
    "Printed",
    "Ready",
    "Reply",
    "RunStatus",
    "RunnerEvent",
    "RunnerExited",
    "Unknown",
    "parse_event",
]


@dataclass(frozen=True)
class RunnerEvent:
    """Fields every event has: when (unix time, runner clock) and for which leaf."""

    KIND: ClassVar[str] = ""
    t: float
    leaf: str | None

    @property
    def kind(self) -> str:
        return self.KIND

    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data (``event`` first), e.g. for an event log."""
        data: dict[str, Any] = {"event": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            data[f.name] = value
        return data


@dataclass(frozen=True)
class Ready(RunnerEvent):
    """First line: the runner imported the package; versions and what it can observe."""

    KIND: ClassVar[str] = "ready"
    protocol: int
    pid: int
    python: str
    branchkey: str
    numpy: str | None
    requests: str | None = None
    urllib3: str | None = None
    transports: tuple[str, ...] = ()
    observed: tuple[str, ...] = ()
    unobserved: tuple[Mapping[str, str], ...] = ()


@dataclass(frozen=True)
class Reply(RunnerEvent):
    """Exactly one per command, carrying its ``id``; ``ok`` False means ``error`` says why
    (``stage`` names the failing step of ``play_round``)."""

    KIND: ClassVar[str] = "reply"
    id: str | None
    cmd: str | None
    ok: bool
    result: Mapping[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    stage: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class HttpAttempt(RunnerEvent):
    """One HTTP attempt urllib3 made (retries are attempts too); ``status`` None with
    ``error`` when the connection broke."""

    KIND: ClassVar[str] = "http_attempt"
    method: str | None
    url: str
    status: int | None = None
    error: str | None = None
    attempt: int | None = None  # 1 for the first try of a call, 2 for its first retry...


@dataclass(frozen=True)
class HttpRequest(RunnerEvent):
    """One call of the client's session (all its attempts): final status or error."""

    KIND: ClassVar[str] = "http_request"
    method: str
    url: str
    status: int | None
    attempts: int
    duration_s: float
    error: str | None = None


@dataclass(frozen=True)
class HttpRetry(RunnerEvent):
    """urllib3 counted a retry (its own words in ``detail``)."""

    KIND: ClassVar[str] = "http_retry"
    detail: str


@dataclass(frozen=True)
class HttpRetryWait(RunnerEvent):
    """The measured wait before a retry (``Retry.sleep``); 0 s before the first retry is
    urllib3's schedule, not the documented 1 s."""

    KIND: ClassVar[str] = "http_retry_wait"
    url: str | None
    seconds: float
    retry_after: bool = False


@dataclass(frozen=True)
class Notification(RunnerEvent):
    """The client's consumer handed an aggregation id to its queue."""

    KIND: ClassVar[str] = "notification"
    aggregation_id: str
    queue_full: bool = False


@dataclass(frozen=True)
class NotificationBlocked(RunnerEvent):
    """The queue was full: the consumer's put waited ``blocked_s`` (WebSocket consumers
    block their event loop meanwhile)."""

    KIND: ClassVar[str] = "notification_blocked"
    aggregation_id: str
    blocked_s: float


@dataclass(frozen=True)
class NotificationDropped(RunnerEvent):
    """An unread id left the queue without the leaf taking it: replaced by a newer one
    (``by="client"``) or discarded by ``close`` (``by="close"``)."""

    KIND: ClassVar[str] = "notification_dropped"
    aggregation_id: str
    by: str


@dataclass(frozen=True)
class RunStatus(RunnerEvent):
    """The client's run-status callback ran (a ``run_status`` notification)."""

    KIND: ClassVar[str] = "run_status"
    run_status: str


@dataclass(frozen=True)
class ConsumerPhase(RunnerEvent):
    """A consumer log line classified: ``connected``, ``consuming``, ``connection_lost``,
    ``reconnecting``, ``reconnect_wait`` (with ``attempt``, ``delay_s``), ``reconnected``,
    ``gave_up``, ``connect_error``, ``ticket``, ``message``, ``stopping``, ``error``.
    ``inferred`` marks a ``connection_lost`` no line said: a consumer that was consuming
    fetched a new ticket or failed to connect (a clean WebSocket close logs nothing)."""

    KIND: ClassVar[str] = "consumer"
    phase: str
    message: str
    attempt: int | None = None
    delay_s: float | None = None
    inferred: bool = False  # no log line said so: deduced from the next phase


@dataclass(frozen=True)
class ConsumerStopped(RunnerEvent):
    """The client's consumer thread ended while the leaf was not being stopped."""

    KIND: ClassVar[str] = "consumer_stopped"
    reason: str


@dataclass(frozen=True)
class LogLine(RunnerEvent):
    """A log record of the package (any level) or of its libraries (INFO and up)."""

    KIND: ClassVar[str] = "log"
    level: str
    source: str
    logger: str
    message: str


@dataclass(frozen=True)
class Printed(RunnerEvent):
    """A line the package printed to stdout."""

    KIND: ClassVar[str] = "print"
    text: str


@dataclass(frozen=True)
class Fatal(RunnerEvent):
    """The runner could not start (the package failed to import)."""

    KIND: ClassVar[str] = "fatal"
    error: str
    trace: str = ""


@dataclass(frozen=True)
class Bye(RunnerEvent):
    """Last line after ``shutdown``; ``stuck`` names leaves whose close did not return."""

    KIND: ClassVar[str] = "bye"
    stuck: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunnerExited(RunnerEvent):
    """Made by the host, not the runner: the runner's stdout closed (it exited)."""

    KIND: ClassVar[str] = "runner_exited"
    returncode: int | None
    stderr_tail: str = ""


@dataclass(frozen=True)
class Unknown(RunnerEvent):
    """An event kind this host does not know, kept whole."""

    KIND: ClassVar[str] = "unknown"
    event: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict)


_KINDS: dict[str, type[RunnerEvent]] = {
    cls.KIND: cls
    for cls in (
        Ready,
        Reply,
        HttpAttempt,
        HttpRequest,
        HttpRetry,
        HttpRetryWait,
        Notification,
        NotificationBlocked,
        NotificationDropped,
        RunStatus,
        ConsumerPhase,
        ConsumerStopped,
        LogLine,
        Printed,
        Fatal,
        Bye,
        RunnerExited,
    )
}


def parse_event(line: str) -> RunnerEvent:
    """One protocol line as its event class; ``ValueError`` for a line that is not an
    event object at all."""
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise ValueError(f"not an event line: {line[:200]!r}")
    kind = data["event"]
    t = float(data.get("t") or 0.0)
    leaf = data.get("leaf")
    leaf = leaf if isinstance(leaf, str) else None
    cls = _KINDS.get(kind)
    if cls is None:
        return Unknown(t=t, leaf=leaf, event=kind, raw=data)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in ("t", "leaf") or f.name not in data:
            continue
        value = data[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(t=t, leaf=leaf, **kwargs)
    except TypeError:  # a required field missing: keep the line rather than lose it
        return Unknown(t=t, leaf=leaf, event=kind, raw=data)
