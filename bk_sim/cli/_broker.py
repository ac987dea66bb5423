"""``bk-sim broker check``: which broker a run would get on this machine, and why."""

from __future__ import annotations

import click

from bk_sim.broker import (
    ENV_AMQP_URL,
    ENV_MANAGEMENT_URL,
    PROVIDERS,
    check_socket_capacity,
    provide_broker,
)
from bk_sim.redact import redact_url


@click.group("broker")
def broker() -> None:
    """Where a run's RabbitMQ comes from."""


@broker.command("check")
@click.option(
    "--provider",
    type=click.Choice(PROVIDERS),
    default="auto",
    show_default=True,
    envvar="BK_SIM_BROKER_PROVIDER",
    help="Which broker to use (env BK_SIM_BROKER_PROVIDER).",
)
@click.option("--amqp-url", default=None, help=f"External broker's AMQP URL (env {ENV_AMQP_URL}).")
@click.option(
    "--management-url",
    default=None,
    help=f"External broker's management API URL (env {ENV_MANAGEMENT_URL}).",
)
@click.option(
    "--enable-plugin",
    is_flag=True,
    help="local: run `rabbitmq-plugins enable rabbitmq_management` if the API is off.",
)
@click.option(
    "--needed-connections",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also check the broker can hold this many connections (its socket limit).",
)
@click.option(
    "--restarts",
    is_flag=True,
    help="The run restarts its broker (chaos restart_broker): auto then starts bk-sim's own node.",
)
def check(
    provider: str,
    amqp_url: str | None,
    management_url: str | None,
    enable_plugin: bool,
    needed_connections: int,
    restarts: bool,
) -> None:
    """Choose the broker as a run would, print it and why; exit 2 when none is usable.

    A testcontainers or process broker is started, checked and removed again.
    """
    with provide_broker(
        provider,
        amqp_url=amqp_url,
        management_url=management_url,
        may_enable_plugin=enable_plugin,
        on_status=lambda message: click.echo(message, err=True),
        needs_restart=restarts,
        needed_connections=needed_connections,
    ) as endpoints:
        click.echo(f"provider:       {endpoints.provider}")
        click.echo(f"amqp_url:       {redact_url(endpoints.amqp_url)}")
        click.echo(f"management_url: {redact_url(endpoints.management_url)}")
        click.echo(f"restartable:    {'yes' if endpoints.restartable else 'no'}")
        click.echo(f"reason:         {endpoints.reason}")
        if needed_connections:
            check_socket_capacity(endpoints, needed_connections)
            click.echo(f"capacity:       enough sockets for {needed_connections} connections")
