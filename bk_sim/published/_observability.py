"""What the harness can and cannot see of a published client, as data for results.json.

The runner observes the package from outside (logging, urllib3's log lines and
``Retry.sleep``, its session's adapters, its queue class and run-status method). Some
things happen where none of those reach; they are named here, each with why and what
fills the gap, so a results file never implies the harness saw what it did not.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

__all__ = ["OBSERVED", "UNOBSERVABLE", "Unobservable", "unobservable"]

OBSERVED: tuple[str, ...] = (
    "http_attempt: every HTTP attempt of the client's requests session, retries included "
    "(urllib3's per-attempt log lines)",
    "http_request: every call of the session with its final status or error and attempt "
    "count (a wrapper around the mounted adapters' send)",
    "http_retry_wait: the measured wait before each retry (a wrapper around urllib3's Retry.sleep)",
    "notification: each aggregation id the consumer hands to client.queue, whether the "
    "queue was full, how long the put blocked, and ids that left it unread (a subclass of "
    "the queue class, set as branchkey.client.LifoQueue before the client is built)",
    "run_status: each run-status notification (a wrapper around the client's callback)",
    "consumer: connect, consume, connection lost, reconnect attempts with their delays, "
    "reconnected, gave up (the package's log lines, classified); consumer_stopped when its "
    "thread ends",
    "log / print: every log record of the package, library warnings, and what it prints",
)


@dataclass(frozen=True)
class Unobservable:
    """One thing the harness cannot see: ``what`` (a short key), ``why``, and what, if
    anything, ``fills_gap``; ``transports`` limits it to those transports."""

    what: str
    why: str
    fills_gap: str = ""
    transports: tuple[str, ...] = ("amqp", "websocket")

    def to_dict(self) -> dict[str, str]:
        data = asdict(self)
        data["transports"] = ",".join(self.transports)
        return data


UNOBSERVABLE: tuple[Unobservable, ...] = (
    Unobservable(
        "ws_ticket_attempts",
        "the WebSocket ticket POST is made with aiohttp inside the consumer, not with the "
        "client's requests session: no per-attempt event, only the package's log lines "
        "('Obtained ticket', 'HTTP client error')",
        "the platform's request counts for POST /api/v1/ws/ticket",
        ("websocket",),
    ),
    Unobservable(
        "ws_clean_close",
        "a clean WebSocket close (1000/1001) ends the package's receive loop without a log "
        "line: the moment of the loss is not seen",
        "a connection_lost marked inferred, emitted when the consumer next asks for a ticket "
        "or fails to connect (right after the loss: the package retries at once)",
        ("websocket",),
    ),
    Unobservable(
        "ws_frames",
        "WebSocket pings, pongs and close frames: websockets library internal",
        "the platform's WebSocket hub log",
        ("websocket",),
    ),
    Unobservable(
        "amqp_heartbeats",
        "AMQP heartbeats and frame-level I/O: pika internal",
        "the broker's connection list (management API)",
        ("amqp",),
    ),
    Unobservable(
        "amqp_connect_attempts",
        "the attempts inside one pika connect (connection_attempts=3, retry_delay=3 s in "
        "2.9.0): seen only as pika's own log lines, not as attempt events",
        "consumer events (one per failed connect, with the package's backoff delay)",
        ("amqp",),
    ),
    Unobservable(
        "amqp_acks",
        "basic_ack after each handled message happens inside the package's callback",
        "the broker's queue depth (management API): unacked messages",
        ("amqp",),
    ),
    Unobservable(
        "delivery_time",
        "when the broker or hub wrote a notification to the client's socket: the harness "
        "sees only when the package's consumer handed it to the queue",
        "the platform's publish time for the round",
    ),
    Unobservable(
        "retry_wait_reason",
        "why urllib3 chose a wait (backoff schedule or Retry-After): only the measured wait "
        "and whether the response carried Retry-After",
    ),
    Unobservable(
        "uploads_counted_twice",
        "whether a retried POST upload was counted twice is a server-side fact",
        "the platform's round record (which uploads, which weights)",
    ),
    Unobservable(
        "reconnect_wait_measured",
        "the consumer's reconnect sleep is not wrapped: its length is the delay the package "
        "logs, and the time between consumer events",
    ),
)


def unobservable(
    transport: str | None = None, runtime: Iterable[Mapping[str, str]] = ()
) -> list[dict[str, str]]:
    """The list for results.json: the static entries for ``transport`` (all when None),
    then what the runner found missing at run time (``Ready.unobserved``)."""
    out = [u.to_dict() for u in UNOBSERVABLE if transport is None or transport in u.transports]
    for item in runtime:
        out.append({"what": str(item.get("what", "")), "why": str(item.get("why", ""))})
    return out
