"""Runner events in the words bk-sim's own client uses, so one judge reads both.

bk_sim's client core reports ``http_request`` per attempt, ``retry_wait``, ``connect``,
``disconnect``, ``reconnect_wait``, ``connect_failed``, ``give_up``, ``notification`` and
``consumer_stopped`` (``bk_sim.client.ClientEvent``). ``as_client_event`` maps a runner
event onto the same kinds and fields (``endpoint`` route names included), so checks that
count retries, reconnects or notifications need no second code path; what only the
published client has (a blocked or dropped notification, its prints and log lines, a
whole session call) keeps its own kind, prefixed ``published_``.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from bk_sim.published._events import (
    ConsumerPhase,
    ConsumerStopped,
    HttpAttempt,
    HttpRetryWait,
    Notification,
    Ready,
    Reply,
    RunnerEvent,
    RunStatus,
)

__all__ = ["as_client_event", "endpoint_of"]

_ROUTES = (
    ("/api/v1/file/upload", "upload"),
    ("/api/v1/file/download/", "download_url"),
    ("/api/v1/run/", "run"),
    ("/api/v1/performance/analysis", "metrics"),
    ("/api/v1/config/branch/", "branch_config"),
    ("/api/v1/ws/ticket", "ws_ticket"),
)
_PHASES = {
    "consuming": "connect",
    "connection_lost": "disconnect",
    "reconnect_wait": "reconnect_wait",
    "connect_error": "connect_failed",
    "gave_up": "give_up",
}


def endpoint_of(url: str | None) -> str | None:
    """The route name bk_sim's client uses for ``url``; a pre-signed blob URL is
    ``download``."""
    if not url:
        return None
    path = urllib.parse.urlsplit(url).path if "://" in url else url.split("?", 1)[0]
    for prefix, name in _ROUTES:
        if path.startswith(prefix):
            return name
    return "download"


def as_client_event(
    event: RunnerEvent, *, leaf_id: str, transport: str, **extra: Any
) -> dict[str, Any] | None:
    """``event`` as a plain dict in bk_sim's client vocabulary, tagged with ``extra``
    (the engine's leaf index, implementation...); None for events that are the
    harness's own business (``ready``, ``reply``: the host turns replies into its own
    upload/download events)."""
    base: dict[str, Any] = {"t": event.t, "leaf_id": leaf_id, **extra}
    if isinstance(event, Ready | Reply):
        return None
    if isinstance(event, HttpAttempt):
        return _drop_none(
            base,
            kind="http_request",
            transport="http",
            method=event.method,
            endpoint=endpoint_of(event.url),
            status=event.status,
            error=event.error,
            attempt=event.attempt,
        )
    if isinstance(event, HttpRetryWait):
        return _drop_none(
            base,
            kind="retry_wait",
            transport="http",
            endpoint=endpoint_of(event.url),
            delay_s=event.seconds,
            measured=True,
        )
    if isinstance(event, Notification):
        return _drop_none(
            base,
            kind="notification",
            transport=transport,
            message_type="aggregation_status",
            value=event.aggregation_id,
        )
    if isinstance(event, RunStatus):
        return _drop_none(
            base,
            kind="notification",
            transport=transport,
            message_type="run_status",
            value=event.run_status,
        )
    if isinstance(event, ConsumerPhase) and event.phase in _PHASES:
        return _drop_none(
            base,
            kind=_PHASES[event.phase],
            transport=transport,
            attempt=event.attempt,
            delay_s=event.delay_s,
            error=event.message if event.phase != "consuming" else None,
            inferred=True if event.inferred else None,
        )
    if isinstance(event, ConsumerStopped):
        return _drop_none(base, kind="consumer_stopped", transport=transport, error=event.reason)
    data = event.to_dict()
    data.pop("event", None)
    data.pop("leaf", None)
    return {**data, **base, "kind": f"published_{event.kind}"}


def _drop_none(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {**base, **{k: v for k, v in fields.items() if v is not None}}
