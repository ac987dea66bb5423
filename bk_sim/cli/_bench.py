"""``bk-sim bench``: the benchmarks' commands (the measuring is ``bk_sim.bench``'s)."""

from __future__ import annotations

from pathlib import Path

import click

from bk_sim.weights import COMPRESSIONS, Compression


def _parse_counts(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        counts = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.BadParameter(f"expected positive integers separated by commas, got {value!r}")
    return sorted(set(counts))


@click.group("bench")
def bench() -> None:
    """Benchmarks of the reference platform."""


@bench.command("aggregate")
@click.option(
    "--params",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Parameters per model (float32).",
)
@click.option(
    "--uploads",
    "counts",
    default="10,100,1000",
    show_default=True,
    callback=_parse_counts,
    help="Upload counts N to measure, comma-separated.",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Layers the parameters are split into.",
)
@click.option(
    "--compression",
    type=click.Choice(COMPRESSIONS),
    default="fast",
    show_default=True,
    help="How the uploads (and the aggregate) are stored.",
)
@click.option(
    "--data",
    type=click.Choice(["random", "rounded"]),
    default="random",
    show_default=True,
    help="random float32, or rounded (trained-like, compresses ~2x).",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the upload files go (a temporary folder inside, removed after).",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Best of this many runs for every time.",
)
@click.option(
    "--force-naive",
    is_flag=True,
    help="Run the naive form even when it would not fit in available memory.",
)
def bench_aggregate(
    params: int,
    counts: list[int],
    layers: int,
    compression: Compression,
    data: str,
    workdir: Path | None,
    repeat: int,
    force_naive: bool,
) -> None:
    """Aggregation step and end to end FedAvg, against the naive form and the decode floor."""
    from bk_sim.bench import aggregate_report

    if layers > params:
        raise click.BadParameter(
            f"{layers} layers need at least as many params", param_hint="--layers"
        )
    for line in aggregate_report(
        params, counts, layers, compression, data, workdir, repeat, force_naive
    ):
        click.echo(line)


@bench.command("round")
@click.option(
    "--scenario",
    "scenario_file",
    type=click.Path(path_type=Path),
    default=Path("scenarios/100_leaves.yaml"),
    show_default=True,
    help="The round to measure (two rounds are run; the second is measured).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--keep-run", is_flag=True, help="Keep the real run's folder (events, results).")
def bench_round_command(
    scenario_file: Path, overrides: tuple[str, ...], as_json: bool, keep_run: bool
) -> None:
    """A real round's wall time as a ratio to the CPU floor of its parts."""
    import json

    from bk_sim.bench import bench_round
    from bk_sim.cli._run import load_for_run

    scenario = load_for_run(scenario_file, overrides, None)
    result = bench_round(scenario, keep_run=keep_run)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.lines():
            click.echo(line)
