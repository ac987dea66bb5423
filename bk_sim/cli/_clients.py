"""``bk-sim clients prepare REQ`` and ``bk-sim clients list``: the env cache by hand.

The coordinator registers the ``clients`` group in the CLI; errors are ``BkSimError``s,
which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

import json

import click

from bk_sim.published import default_cache_dir, list_envs, prepare


@click.group("clients")
def clients() -> None:
    """Published branchkey client environments (one cached venv per requirement)."""


@clients.command("prepare")
@click.argument("requirement")
@click.option("--refresh", is_flag=True, help="Rebuild even when a healthy env is cached.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where envs live (default $BK_SIM_CLIENTS_DIR or $XDG_CACHE_HOME/bk-sim/clients).",
)
def prepare_command(requirement: str, refresh: bool, cache_dir: str | None) -> None:
    """Build (or check) the env for REQUIREMENT, e.g. branchkey==2.9.0."""
    env = prepare(
        requirement,
        cache_dir=cache_dir,
        refresh=refresh,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(
        f"{env.requirement}: branchkey {env.branchkey_version}, numpy {env.numpy_version}, "
        f"transports {'/'.join(env.transports)}, {env.path}"
    )


@clients.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
def list_command(as_json: bool, cache_dir: str | None) -> None:
    """Show the cached envs: requirement, resolved versions, path, size."""
    envs = list_envs(cache_dir)
    if as_json:
        rows = []
        for env in envs:
            row = env.to_dict()
            row["size_bytes"] = env.size_bytes()
            rows.append(row)
        click.echo(json.dumps(rows, indent=2))
        return
    if not envs:
        where = cache_dir or default_cache_dir()
        click.echo(f"no published client envs cached in {where}")
        return
    header = ("requirement", "branchkey", "numpy", "size", "path")
    lines: list[tuple[str, ...]] = [header]
    for env in envs:
        size = f"{env.size_bytes() / 1e6:.0f} MB"
        lines.append(
            (env.requirement, env.branchkey_version, env.numpy_version, size, str(env.path))
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, line[-1]]))
