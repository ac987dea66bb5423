"""Chaos for a run: a fault schedule, its injectors, and what the faults did to the leaves.

``bk-sim chaos SCENARIO`` is ``SimulationRun(scenario, hooks=ChaosRun(scenario))``;
``judge_chaos`` re-judges a finished run from its events and round records.
"""

from bk_sim.chaos._engine import ChaosRun, fault_name, fault_targets
from bk_sim.chaos._injectors import BrokerInjector, CommandRunner, HttpInjector, run_command
from bk_sim.chaos._judge import judge_chaos
from bk_sim.chaos._proxy import ProxyError, ToxicProxy, ToxicState
from bk_sim.chaos._triggers import PhaseTracker

__all__ = [
    "BrokerInjector",
    "ChaosRun",
    "CommandRunner",
    "HttpInjector",
    "PhaseTracker",
    "ProxyError",
    "ToxicProxy",
    "ToxicState",
    "fault_name",
    "fault_targets",
    "judge_chaos",
    "run_command",
]
