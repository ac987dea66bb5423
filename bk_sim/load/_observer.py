"""Client events -> Locust statistics: every HTTP attempt, notification and connect.

``LocustObserver`` is the client's observer (DESIGN.md "Instrumentation hook") for one
Locust user. It fires on the run's own ``environment.events.request`` (never the global
``locust.events``), so Locust's tables, charts and CSVs show per-endpoint latency and
failures exactly as the client saw them, retries included (one row entry per attempt, as
the platform counts them).

Rows (Locust's "Type" / "Name"):

* ``GET``/``POST`` + endpoint (``upload``, ``download_url``, ``download``, ``run``,
  ``metrics``, ``branch_config``, ``ws_ticket``): one entry per HTTP attempt; a failure
  when there was no answer or the status is not the endpoint's success status.
* ``NOTIFY`` + ``aggregation_status`` / ``run_status``: one entry per notification; its
  response time is the time since this user's last upload finished (0 for none), i.e. the
  notification latency a leaf sees. ``NOTIFY aggregate_wait`` failures: a download task
  that waited ``load.aggregate_wait_s`` in vain.
* ``AMQP``/``WEBSOCKET`` + ``connect`` (connect time), ``connect_failed``, ``disconnect``,
  ``give_up``: the notification transport's health (the last three are failures).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from bk_sim.client import ClientEvent

#: The success status of each endpoint (PROTOCOL.md section 2); others answer 200.
SUCCESS_STATUS = {"upload": 201, "metrics": 201}
#: Locust request types that are HTTP attempts (what thresholds and reconciliation use).
HTTP_TYPES = ("GET", "POST", "PUT")
NOTIFY = "NOTIFY"


class HttpAttemptFailed(Exception):
    """One failed HTTP attempt as Locust shows it (status or transport error, no ids)."""


class NotificationFailed(Exception):
    """A notification-side failure: a lost connection, a give-up, a wait in vain."""


class Counters:
    """Per-process tallies for results.json that Locust's stats do not hold."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: collections.Counter[str] = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.values[key] += n

    def take(self) -> dict[str, int]:
        """The tallies since the last take (what a worker reports to the master)."""
        with self._lock:
            out = dict(self.values)
            self.values.clear()
        return out


class LocustObserver:
    """Turns one user's ``ClientEvent``s into ``request`` events; quick, never raises."""

    def __init__(self, environment: Any, counters: Counters) -> None:
        self._request = environment.events.request
        self._counters = counters
        self.last_upload_at: float | None = None

    def on_event(self, event: ClientEvent) -> None:
        kind = event.kind
        if kind == "http_request":
            self._http(event)
        elif kind == "notification":
            self._notification(event)
        elif kind in ("connect", "connect_failed", "disconnect", "give_up"):
            self._transport(event)
        elif kind == "retry_wait":
            self._counters.add("http_retries")
        elif kind == "reconnect_wait":
            self._counters.add("reconnect_waits")

    def _http(self, e: ClientEvent) -> None:
        endpoint = e.endpoint or "?"
        ok_status = SUCCESS_STATUS.get(endpoint, 200)
        exception: Exception | None = None
        if e.status is None:
            exception = HttpAttemptFailed(e.error or "no answer")
        elif e.status != ok_status:
            exception = HttpAttemptFailed(f"HTTP {e.status}")
        if endpoint == "upload" and exception is None:
            self.last_upload_at = time.monotonic()
        self._request.fire(
            request_type=e.method or "HTTP",
            name=endpoint,
            response_time=(e.duration_s or 0.0) * 1000.0,
            response_length=e.bytes_received or 0,
            exception=exception,
            context={"attempt": e.attempt, "bytes_sent": e.bytes_sent},
        )
        self._counters.add("http_bytes_sent", e.bytes_sent or 0)

    def _notification(self, e: ClientEvent) -> None:
        latency_ms = 0.0
        if e.message_type == "aggregation_status" and self.last_upload_at is not None:
            latency_ms = (time.monotonic() - self.last_upload_at) * 1000.0
        self._request.fire(
            request_type=NOTIFY,
            name=e.message_type or "?",
            response_time=latency_ms,
            response_length=len(e.value or ""),
            exception=None,
            context={},
        )
        self._counters.add(f"notifications.{e.message_type}")

    def _transport(self, e: ClientEvent) -> None:
        failed = e.kind != "connect"
        self._request.fire(
            request_type=(e.transport or "notify").upper(),
            name=e.kind,
            response_time=(e.duration_s or 0.0) * 1000.0,
            response_length=0,
            exception=NotificationFailed(e.error or e.kind) if failed else None,
            context={},
        )
        self._counters.add(f"transport.{e.kind}")
