"""Validation: the float64 reference aggregate, tolerances, and forensics.

``reference_aggregate`` computes what a correct platform returns, ``compare`` judges the
returned aggregate layer by layer with tolerances derived from the dtype
(``tolerance_for``), and ``forensics`` recovers the weight each leaf effectively got, so a
failure names the leaf that was dropped, double-counted or mis-weighted.
"""

from bk_sim.validate._compare import Comparison, LayerComparison, compare, tolerance_for
from bk_sim.validate._forensics import Forensics, forensics
from bk_sim.validate._reference import STRATEGIES, ReferenceAggregate, reference_aggregate

__all__ = [
    "STRATEGIES",
    "Comparison",
    "Forensics",
    "LayerComparison",
    "ReferenceAggregate",
    "compare",
    "forensics",
    "reference_aggregate",
    "tolerance_for",
]
