"""Validator throughput, in MB/s of upload data: ``python -m bk_sim.bench.validate [PRESET] [N]``.

Times, for one round of N leaves: regenerating every upload (``leaf_update``), the float64
reference alone, and the whole check as the harness runs it (regenerate one upload at a
time, stream it into ``reference_aggregate``, ``compare`` with the platform's aggregate).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import numpy as np

from bk_sim.scenario import scenario_from_dict
from bk_sim.synth import initial_model, leaf_update, leaf_weightings
from bk_sim.validate import compare, reference_aggregate


def main(argv: list[str]) -> None:
    preset = argv[0] if argv else "mlp_1m"
    n = int(argv[1]) if len(argv) > 1 else 20
    repeats = int(argv[2]) if len(argv) > 2 else 3
    s = scenario_from_dict(
        {
            "name": "bench",
            "leaves": {"count": n, "weighting": {"distribution": "lognormal"}},
            "model": {"preset": preset},
        }
    )
    model, seed = s.model, 7
    w = leaf_weightings(seed, s.leaves.weighting, n)
    base = initial_model(seed, model)

    def stream() -> Iterator[tuple[float, list[np.ndarray]]]:
        return ((float(w[i]), leaf_update(seed, i, 1, base, model)) for i in range(n))

    ref = reference_aggregate(stream(), "fedavg")
    actual = [x.astype(d) for x, d in zip(ref, ref.dtypes, strict=True)]
    mb = n * model.nbytes / 1e6
    for _ in range(repeats):
        t0 = time.perf_counter()
        uploads = [leaf_update(seed, i, 1, base, model) for i in range(n)]
        t1 = time.perf_counter()
        reference_aggregate(zip(w, uploads, strict=True), "fedavg")
        t2 = time.perf_counter()
        del uploads
        t3 = time.perf_counter()
        result = compare(reference_aggregate(stream(), "fedavg"), actual, rtol=None, atol=None)
        t4 = time.perf_counter()
        assert result.passed, result.reason
        sys.stdout.write(
            f"{preset} N={n} ({mb:.0f} MB): leaf_update {mb / (t1 - t0):.0f} MB/s, "
            f"reference_aggregate {mb / (t2 - t1):.0f} MB/s, "
            f"validator (regenerate + reference + compare) {mb / (t4 - t3):.0f} MB/s\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
