"""Where a run's RabbitMQ comes from, and how bk-sim talks to its management API."""

from bk_sim.broker._management import ManagementAPI

__all__ = ["ManagementAPI"]
