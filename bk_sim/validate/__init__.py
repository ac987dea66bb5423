"""Validation: the float64 reference aggregate, tolerances, and forensics.

``reference_aggregate`` computes what a correct platform returns, ``compare`` judges the
returned aggregate layer by layer with tolerances derived from the dtype
(``tolerance_for``), and ``forensics`` recovers the weight each leaf effectively got, so a
failure names the leaf that was dropped, double-counted or mis-weighted.
``judge_analytics`` does the same for a federated-analytics round: combined fields and
derived statistics against the pooled raw columns.
"""

from bk_sim.validate._analytics import (
    AnalyticsFinding,
    AnalyticsJudgement,
    ColumnHistogram,
    column_histograms,
    judge_analytics,
)
from bk_sim.validate._chunked import compare_chunked
from bk_sim.validate._compare import Comparison, LayerComparison, compare, tolerance_for
from bk_sim.validate._forensics import Forensics, forensics
from bk_sim.validate._reference import STRATEGIES, ReferenceAggregate, reference_aggregate

__all__ = [
    "STRATEGIES",
    "AnalyticsFinding",
    "AnalyticsJudgement",
    "ColumnHistogram",
    "Comparison",
    "Forensics",
    "LayerComparison",
    "ReferenceAggregate",
    "column_histograms",
    "compare",
    "compare_chunked",
    "forensics",
    "judge_analytics",
    "reference_aggregate",
    "tolerance_for",
]
