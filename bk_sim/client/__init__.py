"""The faithful BranchKey leaf client core (PROTOCOL.md sections 2-6).

``Client`` speaks the contract over HTTP (requests) and receives notifications over AMQP
(pika) or WebSocket; settings are the frozen config classes below; everything the client
does is reported to an optional ``Observer`` as ``ClientEvent`` objects.

The names of the published ``branchkey`` 2.9.0 and 3.0.1 packages are all here, with the
same positional parameters, defaults and return types (docs/client.md lists the
deliberate differences). The rest is bk-sim's: the consumer extension point
(``consumer_factory=``, ``ConsumerSpec``), the event types, and the reconnect rule the
harness judges against.
"""

from typing import TYPE_CHECKING, Any

from bk_sim.analytics import (
    ANALYTICS_BUNDLE_SUFFIXES,
    NAN_POLICY_OMIT,
    NAN_POLICY_RAISE,
    PAYLOAD_KIND_FEDERATED_ANALYTICS,
    PAYLOAD_KIND_FEDERATED_LEARNING,
)
from bk_sim.client._backoff import attempts_left, reconnect_delay
from bk_sim.client._client import Client
from bk_sim.client._config import (
    AGGREGATED_OUTPUT_DIR,
    APIConfig,
    Credentials,
    RabbitMQConfig,
    RetryConfig,
    RunConfig,
    WebSocketConfig,
)
from bk_sim.client._consumer import (
    ConsumerFactory,
    ConsumerSpec,
    NotificationConsumer,
    Transport,
    amqp_consumer,
    default_consumer,
    websocket_consumer,
)
from bk_sim.client._events import ClientEvent, EventKind, EventSink, Observer
from bk_sim.client._metadata import get_metadata

if TYPE_CHECKING:  # imported on first use, like the AMQP consumer itself (pika)
    from bk_sim.client._shared_amqp import SharedAmqpLoop


def __getattr__(name: str) -> Any:
    if name == "SharedAmqpLoop":
        from bk_sim.client._shared_amqp import SharedAmqpLoop

        return SharedAmqpLoop
    raise AttributeError(name)


__all__ = [
    "AGGREGATED_OUTPUT_DIR",
    "ANALYTICS_BUNDLE_SUFFIXES",
    "APIConfig",
    "Client",
    "ClientEvent",
    "ConsumerFactory",
    "ConsumerSpec",
    "Credentials",
    "EventKind",
    "EventSink",
    "NAN_POLICY_OMIT",
    "NAN_POLICY_RAISE",
    "NotificationConsumer",
    "Observer",
    "PAYLOAD_KIND_FEDERATED_ANALYTICS",
    "PAYLOAD_KIND_FEDERATED_LEARNING",
    "RabbitMQConfig",
    "RetryConfig",
    "RunConfig",
    "SharedAmqpLoop",
    "Transport",
    "WebSocketConfig",
    "amqp_consumer",
    "attempts_left",
    "default_consumer",
    "get_metadata",
    "reconnect_delay",
    "websocket_consumer",
]
