"""How long the FA judge takes for one analytics round: ``python -m bk_sim.bench.analytics
[SITES] [COLUMNS]`` (default 100 x 20, median of 5 runs).

Timed: regenerating every site's raw columns and custom fields from the seed, pooling
them, and judging every combined field and derived statistic. Not timed: building the
honest aggregate the judge is given (a plain sum/min/max over the sites' payloads here,
standing in for the platform).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bk_sim.analytics import ANALYTICS_BUNDLE_SUFFIXES as SUFFIXES
from bk_sim.analytics import PAYLOAD_KIND_KEY as KIND_KEY
from bk_sim.synth import TabularSpec, field_ops, site_columns, site_fields, site_payload
from bk_sim.validate import judge_analytics


def _aggregate(
    spec: TabularSpec, sites: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    ops = {**field_ops(spec)}
    agg: dict[str, np.ndarray] = {}
    for s in range(sites):
        for name, value in site_payload(spec, s).items():
            op = ops.get(name) or {"min": "min", "max": "max"}.get(name.rsplit("_", 1)[-1], "sum")
            if name not in agg:
                agg[name] = (
                    value.astype(np.int64) if value.dtype.kind == "b" and op == "sum" else value
                )
            elif op == "sum":
                agg[name] = agg[name] + value
            elif op == "min":
                agg[name] = np.minimum(agg[name], value)
            elif op == "max":
                agg[name] = np.maximum(agg[name], value)
    derived: dict[str, dict[str, Any]] = {}
    for col in {n.rsplit("_", 1)[0] for n in agg if n.endswith("_sumsq")}:
        v = {s: float(agg[f"{col}_{s}"][0]) for s in SUFFIXES}
        mean = v["sum"] / v["n"]
        var = max(0.0, v["sumsq"] / v["n"] - mean * mean)
        derived[col] = {
            "count": int(v["n"]),
            "nan": int(v["nan"]),
            "sum": v["sum"],
            "min": v["min"],
            "max": v["max"],
            "range": v["max"] - v["min"],
            "mean": mean,
            "variance": var,
            "std": var**0.5,
            "completeness": v["n"] / (v["n"] + v["nan"]),
        }
    agg[KIND_KEY] = np.array("federated_analytics")
    return agg, derived


def _sites(
    spec: TabularSpec, sites: int
) -> Iterator[tuple[str, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]]:
    for s in range(sites):
        cols = site_columns(spec, s)
        yield f"leaf-{s}", cols, site_fields(spec, s, cols)


def main(argv: list[str]) -> int:
    sites = int(argv[0]) if argv else 100
    columns = int(argv[1]) if len(argv) > 1 else 20
    spec = TabularSpec(seed=1, columns=columns)
    agg, derived = _aggregate(spec, sites)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        verdict = judge_analytics(
            _sites(spec, sites), agg, field_ops=field_ops(spec), derived=derived
        )
        times.append(time.perf_counter() - t0)
        if not verdict.passed:
            print(verdict.summary())
            return 1
    rows = sum(len(next(iter(site_columns(spec, s).values()))) for s in range(sites))
    print(
        f"{sites} sites x {columns} columns ({rows} rows in all, {verdict.checks} checks): "
        f"judged in {statistics.median(times):.3f} s median of 5 "
        f"(min {min(times):.3f} s, max {max(times):.3f} s), regeneration included"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
