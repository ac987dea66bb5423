"""``bk-sim run``: one scenario, end to end, with a verdict and an exit code.

``simulation_options``, ``broker_options`` and ``load_for_run`` are shared with
``bk-sim chaos`` (the same simulation under a fault schedule) and ``bk-sim load``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from bk_sim.report import summary_lines
from bk_sim.scenario import Scenario, load_scenario

F = TypeVar("F", bound=Callable[..., Any])


def progress(line: str) -> None:
    """Progress and status lines go to stderr; the verdict and summary to stdout."""
    click.echo(line, err=True)


def broker_options(func: F) -> F:
    """--broker, --amqp-url and --management-url: where a run's broker comes from."""
    func = click.option(
        "--management-url",
        default=None,
        metavar="URL",
        help="The external broker's management API, with credentials "
        "(overrides broker.management_url).",
    )(func)
    func = click.option(
        "--amqp-url",
        default=None,
        metavar="URL",
        help="Use the external broker at this AMQP URL (overrides broker.amqp_url; "
        "implies --broker external unless --broker is given).",
    )(func)
    return click.option(
        "--broker",
        type=click.Choice(["auto", "external", "local", "process", "testcontainers", "none"]),
        default=None,
        help="Where the broker comes from (overrides broker.provider).",
    )(func)


def simulation_options(func: F) -> F:
    """SCENARIO_FILE, --set, the broker options and --enable-plugin, as run and chaos
    take them."""
    func = click.option(
        "--enable-plugin",
        is_flag=True,
        help="Let bk-sim enable RabbitMQ's management plugin on the local broker if it is off.",
    )(func)
    func = broker_options(func)
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY.PATH=VALUE",
        help="Override a scenario key, e.g. --set leaves.count=20 (repeatable).",
    )(func)
    return click.argument("scenario_file", type=click.Path(path_type=Path))(func)


def load_for_run(
    scenario_file: Path,
    overrides: tuple[str, ...],
    broker: str | None,
    amqp_url: str | None = None,
    management_url: str | None = None,
) -> Scenario:
    """The scenario with ``--set`` overrides and the broker options applied."""
    if amqp_url is not None and broker is None:
        broker = "external"
    if broker is not None:
        overrides = (*overrides, f"broker.provider={broker}")
    # JSON-quoted: a URL is a YAML string then, whatever its password holds.
    if amqp_url is not None:
        overrides = (*overrides, f"broker.amqp_url={json.dumps(amqp_url)}")
    if management_url is not None:
        overrides = (*overrides, f"broker.management_url={json.dumps(management_url)}")
    return load_scenario(scenario_file, overrides)


def clients_option(func: F) -> F:
    """``--clients``: a comma-separated list of implementations to compare."""
    return click.option(
        "--clients",
        default=None,
        metavar="IMPL,IMPL,...",
        help="Run the scenario once per client implementation (bk_sim or a published "
        "requirement, e.g. bk_sim,branchkey==2.9.0) and write one comparison.",
    )(func)


@click.command("run")
@simulation_options
@clients_option
def run(
    scenario_file: Path,
    overrides: tuple[str, ...],
    broker: str | None,
    amqp_url: str | None,
    management_url: str | None,
    enable_plugin: bool,
    clients: str | None,
) -> None:
    """Run SCENARIO_FILE's leaves as processes and validate every aggregate.

    Exit code 0 when every check passed, 1 when a check failed, 2 when the run could not
    be made (bad scenario, no broker, platform down, interrupted). With --clients: the
    worst of the runs' exit codes.
    """
    from bk_sim.sim import SimulationRun

    if clients is not None:
        from bk_sim.cli._compare_clients import run_per_client

        sys.exit(
            run_per_client(
                "run",
                clients,
                scenario_file,
                overrides,
                broker,
                amqp_url,
                management_url,
                enable_plugin,
                lambda sc: None,
            )
        )

    scenario = load_for_run(scenario_file, overrides, broker, amqp_url, management_url)
    result = SimulationRun(scenario, progress=progress, may_enable_plugin=enable_plugin).execute()
    for line in summary_lines(result.results):
        click.echo(line)
    sys.exit(result.exit_code)
