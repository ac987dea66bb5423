"""``bk-sim report RUN_DIR [--compare OTHER_RUN_DIR]``: re-render any past run."""

from __future__ import annotations

from pathlib import Path

import click

from bk_sim.report import render_run, summary_lines


@click.command("report")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option(
    "--compare",
    "compare_to",
    type=click.Path(path_type=Path),
    default=None,
    metavar="OTHER_RUN_DIR",
    help="A baseline run folder: show both runs side by side and list regressions.",
)
def report(run_dir: Path, compare_to: Path | None) -> None:
    """Render RUN_DIR's junit.xml and report.html from its events.jsonl and results.json.

    Exit code 0 when the report was rendered (whatever the run's verdict), 2 when RUN_DIR
    or OTHER_RUN_DIR is not a run folder.
    """
    rendered = render_run(run_dir, compare_to)
    for line in summary_lines(rendered.results):
        if not line.startswith(("run folder: ", "report: ")):  # paths follow, as rendered
            click.echo(line)
    if rendered.compare_lines:
        click.echo("")
        for line in rendered.compare_lines:
            click.echo(line)
    click.echo(f"report: {rendered.html}")
    click.echo(f"junit:  {rendered.junit}")
