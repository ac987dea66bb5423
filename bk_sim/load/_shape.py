"""``load.stages`` as a Locust ``LoadTestShape``: step from stage to stage, then stop."""

from __future__ import annotations

from locust import LoadTestShape

from bk_sim.scenario import LoadSpec


def stages_shape(spec: LoadSpec) -> LoadTestShape:
    """A shape that holds each stage's users until its ``until_s``; None (stop) after."""
    stages = [(s.until_s, s.users, s.spawn_rate or spec.spawn_rate) for s in spec.stages]

    class StagesShape(LoadTestShape):
        # Typed here: Locust leaves __init__ and get_run_time unannotated.
        def __init__(self) -> None:
            LoadTestShape.__init__(self)

        def tick(self) -> tuple[int, float] | None:
            elapsed = float(LoadTestShape.get_run_time(self))
            for until_s, users, rate in stages:
                if elapsed < until_s:
                    return users, rate
            return None

    return StagesShape()
