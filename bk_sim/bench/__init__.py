"""The benchmarks, in one place; figures are measured here, never enforced by tests.

* ``bk-sim bench aggregate``: the platform's aggregation step and end to end
  (``aggregate_report``; the command is in ``bk_sim.cli``);
* ``python -m bk_sim.bench.load``: upload load one generator core makes (Locust);
* ``python -m bk_sim.bench.validate``: the validator's throughput;
* ``bk-sim bench round``: a real round's wall time against the CPU floor of its parts
  (``bench_round``).

``aggregate_report`` is imported on first use: ``python -m bk_sim.bench.load`` must let
Locust (gevent) patch before anything imports ssl or threading.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bk_sim.bench._aggregate import aggregate_report
    from bk_sim.bench._round import RoundBench, bench_round

__all__ = ["RoundBench", "aggregate_report", "bench_round"]


def __getattr__(name: str) -> Any:
    if name == "aggregate_report":
        from bk_sim.bench._aggregate import aggregate_report

        return aggregate_report
    if name in ("RoundBench", "bench_round"):
        from bk_sim.bench import _round

        return getattr(_round, name)
    raise AttributeError(name)
