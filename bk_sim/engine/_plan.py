"""Each leaf's part in a run, decided before any leaf starts: a pure function of the seed.

Every leaf host (local processes today, other clients or machines later) gets the same
plans, so the judge can regenerate every upload whoever hosted the leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bk_sim.scenario import OWN_IMPLEMENTATION, Scenario
from bk_sim.synth import leaf_weightings


@dataclass(frozen=True)
class LeafPlan:
    """What one leaf will do in the run; derived from the scenario and its seed."""

    index: int
    credentials: dict[str, str] = field(repr=False)
    weighting: float
    start_delay_s: float = 0.0
    straggle_s: float = 0.0  # extra wait before every upload
    skip_rounds: frozenset[int] = frozenset()  # rounds the leaf does not upload in
    die_round: int | None = None  # the round in which the leaf dies mid-upload
    first_round: int = 1  # > 1: a leaf started again (chaos) joins from this round
    known_aggregates: frozenset[str] = frozenset()  # ids not to take as this run's next
    #: the client the leaf runs: ``bk_sim`` or a published requirement (``branchkey==2.9.0``)
    implementation: str = OWN_IMPLEMENTATION

    @property
    def leaf_id(self) -> str:
        return self.credentials["id"]


def leaf_implementations(scenario: Scenario) -> list[str]:
    """Which client each leaf runs: ``client.implementation`` for all, or the mixed
    fleet's ``leaves.implementations`` fractions, counted by largest remainder (so 8 leaves
    at 0.5/0.25/0.25 are exactly 4/2/2) and dealt to leaves by a seeded shuffle."""
    n = scenario.leaves.count
    mix = scenario.leaves.implementations
    if not mix:
        return [scenario.client.implementation] * n
    names = list(mix)  # the scenario's order: the same file gives the same fleet
    exact = [mix[name] * n for name in names]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    fleet = [name for name, c in zip(names, counts, strict=True) for _ in range(c)]
    order = np.random.default_rng([scenario.seed, 0x1A1E]).permutation(n)
    return [fleet[int(i)] for i in order]


def plan_leaves(scenario: Scenario, credentials: list[dict[str, str]]) -> list[LeafPlan]:
    """Each leaf's weighting and schedule, a pure function of the scenario's seed."""
    spec = scenario.leaves
    n = spec.count
    weightings = leaf_weightings(scenario.seed, spec.weighting, n)
    rng = np.random.default_rng([scenario.seed, 0x5EED])
    jitter = rng.uniform(0.0, spec.start_jitter_s, n) if spec.start_jitter_s > 0 else np.zeros(n)
    stragglers = set(
        rng.choice(n, size=round(spec.stragglers.fraction * n), replace=False).tolist()
    )
    dying = set(rng.choice(n, size=round(spec.dropouts.die_fraction * n), replace=False).tolist())
    implementations = leaf_implementations(scenario)
    plans = []
    for i in range(n):
        skips = frozenset(
            r
            for r in range(1, scenario.rounds + 1)
            if spec.dropouts.skip_fraction > 0 and rng.random() < spec.dropouts.skip_fraction
        )
        die_round = int(rng.integers(1, scenario.rounds + 1)) if i in dying else None
        plans.append(
            LeafPlan(
                index=i,
                credentials=credentials[i],
                weighting=float(weightings[i]),
                start_delay_s=float(jitter[i]),
                straggle_s=spec.stragglers.delay_s if i in stragglers else 0.0,
                skip_rounds=skips,
                die_round=die_round,
                implementation=implementations[i],
            )
        )
    return plans
