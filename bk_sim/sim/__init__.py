"""The simulation: N leaves as processes playing rounds against a platform.

``SimulationRun(scenario).execute()`` is ``bk-sim run``; with chaos hooks it is
``bk-sim chaos``. Leaves' tensors are deterministic (``bk_sim.synth``): any upload can be
regenerated from the scenario seed, the leaf index, the round and the aggregate the leaf
started from. ``LocalProcessHost`` is the engine's ``LeafHost`` for local leaf processes.
"""

from bk_sim.sim._fleet import FleetHost
from bk_sim.sim._host import LocalProcessHost
from bk_sim.sim._published_host import (
    PublishedHost,
    RunnerClient,
    prepare_implementations,
    published_requirements,
)
from bk_sim.sim._run import SimulationRun

__all__ = [
    "FleetHost",
    "LocalProcessHost",
    "PublishedHost",
    "RunnerClient",
    "SimulationRun",
    "prepare_implementations",
    "published_requirements",
]
