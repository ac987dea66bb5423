"""Upload payloads made once, before the load starts, and shared by every user.

A load generator that compresses random tensors while it runs measures its own CPU, not
the platform. So the ``load.payload_variants`` distinct archives are generated up front
(the simulation's deterministic synthetic weights, encoded as ``payload.compression``
says) into files, and each user uploads the file of its variant. Variants differ in bytes
(and so digests), so leaves do not all upload the same file; a leaf re-uploading the same
bytes in the same round is counted once by the platform, as the contract says.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bk_sim import weights
from bk_sim.scenario import Scenario
from bk_sim.synth import leaf_update, leaf_weightings

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PayloadCache:
    """The prepared upload files; ``path(slot)`` is the one a leaf slot uploads."""

    paths: tuple[Path, ...]
    sizes: tuple[int, ...]
    build_s: float
    #: ``x-bk-file-digest`` of each file: how a round record's upload names its variant
    digests: tuple[str, ...] = ()

    def path(self, slot: int) -> Path:
        return self.paths[slot % len(self.paths)]

    @property
    def mean_bytes(self) -> float:
        return sum(self.sizes) / len(self.sizes)


def build_payloads(scenario: Scenario, folder: Path) -> PayloadCache:
    """Write ``load.payload_variants`` upload archives into ``folder`` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = scenario.load.payload_variants
    weightings = leaf_weightings(scenario.seed, scenario.leaves.weighting, scenario.leaves.count)
    t0 = time.perf_counter()
    paths, sizes, digests = [], [], []
    for v in range(count):
        layers = leaf_update(scenario.seed, v, 1, None, scenario.model)
        data = weights.encode_weights(
            float(weightings[v % len(weightings)]),
            layers,
            compression=scenario.payload.compression,
        )
        path = folder / f"payload-{v}.npz"
        path.write_bytes(data)
        paths.append(path)
        sizes.append(len(data))
        digests.append(weights.digest_header(data))
    build_s = time.perf_counter() - t0
    _log.info("%d payloads of ~%d bytes made in %.2f s", count, sum(sizes) // count, build_s)
    return PayloadCache(tuple(paths), tuple(sizes), build_s, tuple(digests))
