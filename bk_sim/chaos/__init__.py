"""Chaos for a run: a fault schedule, its injectors, and what the faults did to the leaves."""

from bk_sim.chaos._proxy import ProxyError, ToxicProxy, ToxicState

__all__ = ["ProxyError", "ToxicProxy", "ToxicState"]
