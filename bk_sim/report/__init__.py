"""Turning a run folder (events.jsonl, results.json) into what people and CI read."""

from bk_sim.report._implementations import ComparedRun as ComparedRun
from bk_sim.report._implementations import comparison_lines as comparison_lines
from bk_sim.report._implementations import write_comparison as write_comparison
from bk_sim.report._junit import junit_tree as junit_tree
from bk_sim.report._load import RunData as RunData
from bk_sim.report._load import load_run as load_run
from bk_sim.report._render import Rendered as Rendered
from bk_sim.report._render import render_run as render_run
from bk_sim.report._summary import headline as headline
from bk_sim.report._summary import summary_lines as summary_lines

__all__ = [
    "ComparedRun",
    "Rendered",
    "RunData",
    "comparison_lines",
    "headline",
    "junit_tree",
    "load_run",
    "render_run",
    "summary_lines",
    "write_comparison",
]
