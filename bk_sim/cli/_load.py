"""``bk-sim load``: Locust load on the platform's leaf API, headless, web UI or distributed.

gevent must monkey-patch before anything else is imported, and ``bk-sim`` has already
imported requests, ssl and threading by the time a subcommand runs. So when this command
finds the process unpatched it re-executes itself as a Python whose first import is
Locust (which patches), running this same CLI with the same arguments.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from bk_sim.cli._run import broker_options, load_for_run

#: The re-executed process: Locust (gevent) patches first, then the CLI runs as usual.
_PATCHED_MAIN = "import locust; from bk_sim.cli import main; main(prog_name='bk-sim')"


def _progress(line: str) -> None:
    click.echo(line, err=True)


def _patched() -> bool:
    mod = sys.modules.get("gevent.monkey")
    return bool(mod is not None and mod.is_module_patched("socket"))


@click.command("load")
@click.argument("scenario_file", type=click.Path(path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a scenario key, e.g. --set load.users=50 (repeatable).",
)
@broker_options
@click.option("--web", is_flag=True, help="Open Locust's web UI (on --web-host) instead.")
@click.option("--web-host", default="127.0.0.1", show_default=True)
@click.option("--web-port", default=8089, show_default=True, type=int)
@click.option("--master", "role", flag_value="master", help="Run as Locust master.")
@click.option("--worker", "role", flag_value="worker", help="Run as Locust worker.")
@click.option("--master-host", default="127.0.0.1", show_default=True, help="Worker: master.")
@click.option("--master-port", default=5557, show_default=True, type=int)
@click.option("--master-bind-host", default="*", show_default=True, help="Master: listen address.")
@click.option(
    "--expect-workers",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Master: workers to wait for before the load starts.",
)
@click.option(
    "--advertise-host",
    default=None,
    help="Master: address workers reach this machine's platform and broker at "
    "(default 127.0.0.1; another address makes the platform listen on all interfaces).",
)
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write here instead of <report.dir>/<name>-load-<time>/.",
)
def load(
    scenario_file: Path,
    overrides: tuple[str, ...],
    broker: str | None,
    amqp_url: str | None,
    management_url: str | None,
    web: bool,
    web_host: str,
    web_port: int,
    role: str | None,
    master_host: str,
    master_port: int,
    master_bind_host: str,
    expect_workers: int,
    advertise_host: str | None,
    run_dir: Path | None,
) -> None:
    """Load the platform's leaf API with Locust users that drive the leaf client.

    Writes Locust's CSVs and HTML report plus results.json into a run folder. Exit code
    0 when the thresholds were met, 1 when one was not, 2 when the load could not run.
    """
    if not _patched():
        argv = [sys.executable, "-c", _PATCHED_MAIN, *sys.argv[1:]]
        if "load" not in sys.argv[1:]:
            raise click.UsageError("run as: bk-sim [-v] load SCENARIO [options]")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, argv)
    from bk_sim.load import LoadOptions, LoadRun

    logging.getLogger("locust").setLevel(max(logging.getLogger().level, logging.WARNING))
    scenario = load_for_run(scenario_file, overrides, broker, amqp_url, management_url)
    options = LoadOptions(
        role=role or "local",  # type: ignore[arg-type]
        web=web,
        web_host=web_host,
        web_port=web_port,
        master_host=master_host,
        master_port=master_port,
        master_bind_host=master_bind_host,
        expect_workers=expect_workers,
        advertise_host=advertise_host,
        run_dir=run_dir,
    )
    result = LoadRun(scenario, options, progress=_progress).execute()
    if result.results:
        res = result.results
        click.echo(("PASSED" if res["passed"] else "FAILED") + f": {res['verdict']}")
        http = res["http"]
        click.echo(
            f"HTTP attempts {http['requests']}, failed {http['failures']}, "
            f"p95 {http['p95_ms']} ms, {http['rps']:.1f}/s; run folder {result.run_dir}"
        )
    sys.exit(result.exit_code)
