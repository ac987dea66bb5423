"""The notification-consumer extension point (as httpx takes ``transport=``).

A ``Client`` gets its consumer from a factory: ``consumer_factory(spec)`` with a
``ConsumerSpec`` holding everything a consumer needs from its client (settings, the
ticket call, the message handler, the event sink). The default picks the AMQP or the
WebSocket consumer by ``spec.transport``; a host (the Locust user, a test) passes its own
factory, and nobody overrides the client's privates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from bk_sim.client._config import Credentials, RabbitMQConfig, WebSocketConfig
from bk_sim.client._events import EventSink

Transport = Literal["amqp", "websocket"]


class NotificationConsumer(Protocol):
    """What the client needs of a consumer: start at once, close promptly, say if up."""

    def start(self) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...
    @property
    def connected(self) -> bool: ...


@dataclass(frozen=True)
class ConsumerSpec:
    """What a consumer gets from its client.

    ``on_message`` takes one decoded JSON object (PROTOCOL.md section 4) and never
    raises; ``get_ticket`` is the WebSocket ticket call (it raises ``ClientError``).
    """

    transport: Transport
    credentials: Credentials
    rabbitmq: RabbitMQConfig
    broker_host: str
    websocket: WebSocketConfig
    websocket_url: str
    verify_ssl: bool
    get_ticket: Callable[[], dict[str, Any]]
    on_message: Callable[[dict[str, Any]], None]
    events: EventSink


ConsumerFactory = Callable[[ConsumerSpec], NotificationConsumer]


def amqp_consumer(spec: ConsumerSpec) -> NotificationConsumer:
    """The AMQP consumer (pika, one IOLoop thread; cooperative under gevent)."""
    from bk_sim.client._amqp import AmqpConsumer

    return AmqpConsumer(
        spec.credentials, spec.rabbitmq, spec.broker_host, spec.on_message, spec.events
    )


def websocket_consumer(spec: ConsumerSpec) -> NotificationConsumer:
    """The WebSocket consumer (blocking sockets in a thread; a greenlet under gevent)."""
    from bk_sim.client._websocket import WebSocketConsumer

    return WebSocketConsumer(
        spec.websocket_url,
        spec.websocket,
        spec.get_ticket,
        spec.on_message,
        spec.events,
        verify_ssl=spec.verify_ssl,
    )


def default_consumer(spec: ConsumerSpec) -> NotificationConsumer:
    """``websocket_consumer`` or ``amqp_consumer``, by ``spec.transport``."""
    if spec.transport == "websocket":
        return websocket_consumer(spec)
    return amqp_consumer(spec)
