"""``bk-sim scenario``: check a scenario file without running it, or print the schema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bk_sim.scenario import load_scenario, scenario_schema_doc


@click.group("scenario")
def scenario() -> None:
    """Check scenario files and show their schema."""


@scenario.command("check")
@click.argument("scenario_files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a scenario key, e.g. --set leaves.count=20 (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved scenario as JSON.")
def check(scenario_files: tuple[Path, ...], overrides: tuple[str, ...], as_json: bool) -> None:
    """Load and validate SCENARIO_FILES (exit code 2 with the reason on the first bad one)."""
    for path in scenario_files:
        s = load_scenario(path, overrides)
        if as_json:
            click.echo(json.dumps(s.to_dict(), indent=2))
            continue
        click.echo(
            f"{path}: ok: {s.name}, {s.leaves.count} leaves in {s.leaves.effective_processes} "
            f"processes, {s.rounds} rounds, model {s.model.preset or 'custom'} "
            f"({s.model.parameter_count:,} parameters, {_size(s.model.nbytes)} per upload), "
            f"{s.platform.mode} platform, {s.platform.strategy}, {s.transport}"
        )


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 100_000 else f"{nbytes / 1e3:.1f} kB"


@scenario.command("schema")
def schema() -> None:
    """Print every scenario key with its type, default and meaning (Markdown)."""
    click.echo(scenario_schema_doc(), nl=False)
