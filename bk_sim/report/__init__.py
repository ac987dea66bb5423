"""Turning a run folder (events.jsonl, results.json) into what people and CI read."""

from bk_sim.report._summary import summary_lines

__all__ = ["summary_lines"]
