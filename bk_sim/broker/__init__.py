"""Where a run's RabbitMQ comes from, and how bk-sim talks to its management API."""

from bk_sim.broker._management import DEFAULT_MANAGEMENT_URL, ManagementAPI
from bk_sim.broker._process import NodeTLS, process_available
from bk_sim.broker._provider import (
    ENV_AMQP_URL,
    ENV_MANAGEMENT_URL,
    PROVIDERS,
    BrokerEndpoints,
    check_socket_capacity,
    provide_broker,
    restart_broker,
)
from bk_sim.broker._testcontainer import docker_available

__all__ = [
    "DEFAULT_MANAGEMENT_URL",
    "ENV_AMQP_URL",
    "ENV_MANAGEMENT_URL",
    "PROVIDERS",
    "BrokerEndpoints",
    "ManagementAPI",
    "NodeTLS",
    "check_socket_capacity",
    "docker_available",
    "process_available",
    "provide_broker",
    "restart_broker",
]
