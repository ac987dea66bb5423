"""The simulation: N leaves as processes playing rounds against a platform.

``SimulationRun(scenario).execute()`` is ``bk-sim run``; with chaos hooks it is
``bk-sim chaos``. Leaves' tensors are deterministic (``bk_sim.synth``): any upload can be
regenerated from the scenario seed, the leaf index, the round and the aggregate the leaf
started from. ``LocalProcessHost`` is the engine's ``LeafHost`` for local leaf processes.
"""

from bk_sim.sim._host import LocalProcessHost
from bk_sim.sim._run import SimulationRun

__all__ = ["LocalProcessHost", "SimulationRun"]
