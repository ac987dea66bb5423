"""``bk-sim run``: one scenario, end to end, with a verdict and an exit code."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from bk_sim.report import summary_lines
from bk_sim.scenario import load_scenario


def _progress(line: str) -> None:
    click.echo(line, err=True)


@click.command("run")
@click.argument("scenario_file", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a scenario key, e.g. --set leaves.count=20 (repeatable).",
)
@click.option(
    "--broker",
    type=click.Choice(["auto", "external", "local", "testcontainers", "none"]),
    default=None,
    help="Where the broker comes from (overrides broker.provider).",
)
@click.option(
    "--enable-plugin",
    is_flag=True,
    help="Let bk-sim enable RabbitMQ's management plugin on the local broker if it is off.",
)
def run(
    scenario_file: Path, overrides: tuple[str, ...], broker: str | None, enable_plugin: bool
) -> None:
    """Run SCENARIO_FILE's leaves as processes and validate every aggregate.

    Exit code 0 when every check passed, 1 when a check failed, 2 when the run could not
    be made (bad scenario, no broker, platform down).
    """
    from bk_sim.sim._orchestrator import SimulationRun

    if broker is not None:
        overrides = (*overrides, f"broker.provider={broker}")
    scenario = load_scenario(scenario_file, overrides)
    result = SimulationRun(
        scenario, progress=_progress, may_enable_plugin=enable_plugin
    ).execute()
    for line in summary_lines(result.results):
        click.echo(line)
    sys.exit(result.exit_code)
