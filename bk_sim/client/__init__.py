"""The faithful BranchKey leaf client core (PROTOCOL.md sections 2-6).

``Client`` speaks the contract over HTTP (requests) and receives notifications over AMQP
(pika) or WebSocket; settings are the frozen config classes below; everything the client
does is reported to an optional ``Observer`` as ``ClientEvent`` objects.
"""

from bk_sim.client._backoff import attempts_left, reconnect_delay
from bk_sim.client._client import Client
from bk_sim.client._config import (
    APIConfig,
    Credentials,
    RabbitMQConfig,
    RetryConfig,
    RunConfig,
    WebSocketConfig,
)
from bk_sim.client._events import ClientEvent, EventSink, Observer

__all__ = [
    "APIConfig",
    "Client",
    "ClientEvent",
    "Credentials",
    "EventSink",
    "Observer",
    "RabbitMQConfig",
    "RetryConfig",
    "RunConfig",
    "WebSocketConfig",
    "attempts_left",
    "reconnect_delay",
]
