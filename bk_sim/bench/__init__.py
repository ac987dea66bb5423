"""The benchmarks, in one place; figures are measured here, never enforced by tests.

* ``bk-sim bench aggregate``: the platform's aggregation step and end to end (``bench``);
* ``python -m bk_sim.bench.load``: upload load one generator core makes (Locust);
* ``python -m bk_sim.bench.validate``: the validator's throughput.

``bench`` is imported on first use: ``python -m bk_sim.bench.load`` must let Locust
(gevent) patch before anything imports ssl or threading.
"""

from __future__ import annotations

from typing import Any

__all__ = ["bench"]


def __getattr__(name: str) -> Any:
    if name == "bench":
        from bk_sim.bench._aggregate import bench

        return bench
    raise AttributeError(name)
