"""Deterministic synthetic data: leaf weights regenerated from a few integers.

Used by the simulation's leaves, the load payloads, the validator's benchmark and the
judge, so it sits below all of them.
"""

from bk_sim.synth._model import initial_model, leaf_update, leaf_weightings

__all__ = ["initial_model", "leaf_update", "leaf_weightings"]
