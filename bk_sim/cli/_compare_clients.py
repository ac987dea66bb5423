"""``--clients a,b,c`` of ``bk-sim run`` and ``bk-sim chaos``: the same scenario once per
client implementation, then one comparison (comparison.json, report.html).

Every implementation's env is checked and prepared before the first run starts, so a bad
requirement is a one-line error (exit 2) instead of a failure after minutes of runs.
Each run gets its own folder under ``<report.dir>/<name>-<kind>-clients-<time>/``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import click

from bk_sim.cli._run import load_for_run, progress
from bk_sim.engine import RunHooks
from bk_sim.errors import BkSimError, ScenarioError
from bk_sim.report import ComparedRun, comparison_lines, summary_lines, write_comparison
from bk_sim.scenario import Scenario

HooksFor = Callable[[Scenario], RunHooks | None]


def parse_clients(text: str) -> list[str]:
    """``"bk_sim, branchkey==2.9.0"`` -> the labels, refusing an empty or repeated one."""
    labels = [part.strip() for part in text.split(",")]
    if not labels or any(not x for x in labels):
        raise ScenarioError(f"--clients {text}: expected names separated by commas, none empty")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ScenarioError(f"--clients {text}: {', '.join(repeated)} given twice")
    return labels


def run_per_client(
    kind: str,
    clients: str,
    scenario_file: Path,
    overrides: tuple[str, ...],
    broker: str | None,
    amqp_url: str | None,
    management_url: str | None,
    enable_plugin: bool,
    hooks_for: HooksFor,
    extra_lines: Callable[[dict[str, object]], list[str]] | None = None,
) -> int:
    """Run the scenario per implementation; write the comparison; the worst exit code."""
    from bk_sim.sim import SimulationRun, prepare_implementations

    labels = parse_clients(clients)
    scenarios: dict[str, Scenario] = {}
    for label in labels:
        sc = load_for_run(
            scenario_file,
            (*overrides, f"client.implementation={json.dumps(label)}"),
            broker,
            amqp_url,
            management_url,
        )
        if sc.leaves.implementations:
            raise ScenarioError(
                f"{scenario_file}: leaves.implementations (a mixed fleet) and --clients "
                "both say which client the leaves run: give one"
            )
        scenarios[label] = sc
    for sc in scenarios.values():
        prepare_implementations(sc, progress)
    first = scenarios[labels[0]]
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(first.report.dir) / f"{first.name}-{kind}-clients-{stamp}"
    n = 2
    while out.exists():
        out = out.with_name(f"{first.name}-{kind}-clients-{stamp}-{n}")
        n += 1
    runs: list[ComparedRun] = []
    for label, sc in scenarios.items():
        progress(f"--clients: {kind} with client.implementation={label}")
        run_dir = out / _slug(label)
        try:
            result = SimulationRun(
                sc,
                progress=progress,
                run_dir=run_dir,
                hooks=hooks_for(sc),
                may_enable_plugin=enable_plugin,
            ).execute()
        except BkSimError as exc:
            progress(f"--clients: {label} could not run: {exc}")
            runs.append(ComparedRun(label, run_dir if run_dir.exists() else None, 2, str(exc)))
            continue
        runs.append(ComparedRun(label, result.run_dir, result.exit_code))
        click.echo(f"\n== {label}")
        for line in summary_lines(result.results):
            click.echo(line)
        if extra_lines is not None and result.results:
            for line in extra_lines(result.results):
                click.echo(line)
    path = write_comparison(out, runs, title=f"{first.name}: {kind} per client implementation")
    for line in comparison_lines(path):
        click.echo(line)
    click.echo(f"comparison report: {out / 'report.html'}")
    codes = [r.exit_code for r in runs]
    return 2 if 2 in codes else (1 if 1 in codes else 0)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label.replace("==", "-"))
