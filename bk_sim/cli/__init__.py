"""The ``bk-sim`` command line, all of it: parse, call one function, map errors to exit codes.

Exit codes: 0 every check passed, 1 a check failed, 2 the run could not be made.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from bk_sim import __version__
from bk_sim.errors import BkSimError


class _Group(click.Group):
    """Turns every ``BkSimError`` into a one-line reason and its exit code; Ctrl-C and
    an unexpected error (a bug, shown with its traceback) exit 2, because Python's and
    click's own exit code 1 means "a check failed" here."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BkSimError as exc:
            click.echo(f"bk-sim: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("bk-sim: interrupted", err=True)
            sys.exit(2)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - a bk-sim bug: show it, but exit 2, not 1
            traceback.print_exc()
            click.echo(f"bk-sim: internal error: {type(exc).__name__}: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="bk-sim")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """bk-sim: federated simulation, load and chaos testing for BranchKey."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


from bk_sim.cli._bench import bench  # noqa: E402
from bk_sim.cli._broker import broker  # noqa: E402
from bk_sim.cli._chaos import chaos  # noqa: E402
from bk_sim.cli._clients import clients  # noqa: E402
from bk_sim.cli._load import load  # noqa: E402
from bk_sim.cli._platform import platform  # noqa: E402
from bk_sim.cli._report import report  # noqa: E402
from bk_sim.cli._run import run  # noqa: E402
from bk_sim.cli._scenario import scenario  # noqa: E402

for _command in (bench, broker, run, platform, scenario, report, load, chaos, clients):
    main.add_command(_command)

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    main()
