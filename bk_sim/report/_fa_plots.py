"""The federated-analytics plot: each column's pooled distribution against the per-site
ones (inline SVG, the report's style).

Input: the JSON form of ``bk_sim.validate.column_histograms`` (``{column: {"edges",
"pooled", "sites": {label: counts}}}``), as results.json keeps it, so ``bk-sim report``
re-renders it from a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from bk_sim.report._plots import _figure, _styled, _svg

POOLED_COLOR = "#2563eb"
SITE_COLOR = "#6b7280"


@_styled
def analytics_distribution_plot(
    histograms: Mapping[str, Mapping[str, Any]],
    *,
    max_columns: int = 12,
    max_sites: int = 30,
) -> str:
    """Small multiples, one per column: densities of up to ``max_sites`` sites (grey, thin,
    evenly chosen) under the pooled density (blue, bold). Densities, not counts, so a site
    with few rows is as visible as a large one and shifts between sites show."""
    names = sorted(histograms)[:max_columns]
    if not names:
        return ""
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(2.6 * cols, 1.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        h = histograms[name]
        edges = np.asarray(h["edges"], dtype=np.float64)
        width = np.diff(edges)
        labels = sorted(h["sites"])
        step = max(1, math.ceil(len(labels) / max_sites))
        for label in labels[::step]:
            counts = np.asarray(h["sites"][label], dtype=np.float64)
            if counts.sum() > 0:
                ax.stairs(
                    counts / (counts.sum() * width),
                    edges,
                    color=SITE_COLOR,
                    alpha=0.35,
                    linewidth=0.6,
                )
        pooled = np.asarray(h["pooled"], dtype=np.float64)
        if pooled.sum() > 0:
            ax.stairs(pooled / (pooled.sum() * width), edges, color=POOLED_COLOR, linewidth=1.8)
        shown = len(labels[::step])
        ax.set_title(f"{name} ({shown} of {len(labels)} sites)" if shown < len(labels) else name)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    return _svg(fig)
