"""``bk-sim chaos``: a scenario's run with its fault schedule, and what the faults did."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from bk_sim.cli._compare_clients import run_per_client
from bk_sim.cli._run import clients_option, load_for_run, simulation_options
from bk_sim.cli._run import progress as _progress
from bk_sim.report import summary_lines


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def chaos_lines(results: Mapping[str, Any]) -> list[str]:
    """Lines for the terminal: per fault, who was hit, detection and reconnect times."""
    section = results.get("chaos") or {}
    lines = ["", "chaos:"]
    for f in section.get("faults", []):
        det, rec = f.get("detect_s") or {}, f.get("reconnect_s") or {}
        state = "injected" if f.get("injected") else "NOT injected"
        extra = f"  http retries {f['http_retries']}" if f.get("http_retries") else ""
        lines.append(
            f"  {f['name']:<22} {f.get('kind') or '':<16} {state:<12} "
            f"disconnected {f.get('disconnected', 0):>3}  reconnected {f.get('reconnected', 0):>3}"
            f"  detect p50/max {_fmt(det.get('p50'))}/{_fmt(det.get('max'))} s"
            f"  reconnect p50/max {_fmt(rec.get('p50'))}/{_fmt(rec.get('max'))} s{extra}"
            + (f"  error: {f['error']}" if f.get("error") else "")
        )
    n = section.get("notifications") or {}
    if n:
        lines.append(
            f"  notifications: {n.get('received')}/{n.get('expected')} received, "
            f"{n.get('lost')} lost, {n.get('duplicates')} duplicated, {n.get('late')} late "
            f"(> {n.get('late_after_s'):g} s)"
        )
    doubles = (section.get("uploads") or {}).get("double_counted") or []
    for d in doubles[:5]:
        lines.append(
            f"  round {d['round']}: leaf {d['leaf']} ({d['leaf_id']}) counted {d['count']} times"
        )
    for k in section.get("killed", [])[:10]:
        lines.append(f"  killed: leaf {k['leaf']} in round {k['round']} ({k['reason']})")
    return lines


@click.command("chaos")
@simulation_options
@clients_option
def chaos(
    scenario_file: Path,
    overrides: tuple[str, ...],
    broker: str | None,
    amqp_url: str | None,
    management_url: str | None,
    enable_plugin: bool,
    clients: str | None,
) -> None:
    """Run SCENARIO_FILE with its `chaos` fault schedule; judge recovery and correctness.

    Exit code 0 when every check passed (the chaos expectations included), 1 when a check
    failed, 2 when the run could not be made. With --clients: the worst of the runs'.
    """
    from bk_sim.chaos import ChaosRun
    from bk_sim.sim import SimulationRun

    if clients is not None:
        sys.exit(
            run_per_client(
                "chaos",
                clients,
                scenario_file,
                overrides,
                broker,
                amqp_url,
                management_url,
                enable_plugin,
                lambda sc: ChaosRun(sc, say=_progress),
                chaos_lines,
            )
        )

    scenario = load_for_run(scenario_file, overrides, broker, amqp_url, management_url)
    if not scenario.chaos.faults:
        _progress("chaos: the scenario schedules no faults (a baseline run)")
    hooks = ChaosRun(scenario, say=_progress)
    result = SimulationRun(
        scenario, progress=_progress, hooks=hooks, may_enable_plugin=enable_plugin
    ).execute()
    for line in summary_lines(result.results):
        click.echo(line)
    for line in chaos_lines(result.results):
        click.echo(line)
    sys.exit(result.exit_code)
