"""Plots as inline SVG strings, drawn with matplotlib's object API (no pyplot state).

Text stays text (``svg.fonttype: none``) with a generic sans-serif family, so the page
never fetches a font and stays small; ids are salted deterministically so a re-render of
the same run gives the same bytes.
"""

from __future__ import annotations

import functools
import io
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec

import matplotlib
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator, NullFormatter

from bk_sim.report._metrics import FaultSpan, Mark, Span

_P = ParamSpec("_P")

_RC: dict[Any, Any] = {  # matplotlib types its keys as one Literal of every rc name
    "svg.fonttype": "none",
    "svg.hashsalt": "bk-sim-report",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "sans-serif"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e5e7eb",
    "grid.linewidth": 0.6,
    "axes.axisbelow": True,
    "axes.edgecolor": "#9ca3af",
    "xtick.color": "#374151",
    "ytick.color": "#374151",
    "legend.frameon": False,
}

COLORS = {
    "prepare": "#d1d5db",
    "upload": "#2563eb",
    "wait": "#fcd9a8",
    "download": "#16a34a",
    "notified": "#111827",
    "fault": "#dc2626",
    "leaf_error": "#dc2626",
    "leaf_died": "#7f1d1d",
    "round_skipped": "#6b7280",
    "disconnect": "#9333ea",
    "give_up": "#7f1d1d",
    "connect": "#16a34a",
    "reconnect_wait": "#f59e0b",
    "connect_failed": "#dc2626",
    "notification": "#0891b2",
}

_MARKERS = {
    "notified": ("|", 9),
    "leaf_error": ("x", 7),
    "leaf_died": ("X", 8),
    "round_skipped": ("o", 5),
    "disconnect": ("v", 6),
    "give_up": ("X", 8),
}


def _svg(fig: Figure) -> str:
    """The figure as an ``<svg>`` element ready to inline (no XML prolog, no doctype)."""
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _styled(fn: Callable[_P, str]) -> Callable[_P, str]:
    """Run a plot function under the report's rc settings (artists read them when made)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> str:
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)

    return wrapper


def _min_width(faults: Sequence[FaultSpan], *times: Sequence[float]) -> float:
    """A width an instant fault (a connection kill) still shows at: 0.8 % of the time axis."""
    pts = [t for ts in times for t in ts] + [x for f in faults for x in (f.start, f.end)]
    return 0.008 * (max(pts) - min(pts)) if pts else 0.05


def _shade_faults(
    ax: Any, faults: Sequence[FaultSpan], min_w: float = 0.05, label: bool = True
) -> None:
    for i, f in enumerate(faults):
        if f.run_wide:
            end = max(f.end, f.start + min_w)
            ax.axvspan(f.start, end, color=COLORS["fault"], alpha=0.12, lw=0)
            if label:
                ax.annotate(
                    f.label,
                    xy=(f.start, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(2, -10 - 9 * (i % 3)),
                    textcoords="offset points",
                    fontsize=7,
                    color=COLORS["fault"],
                )


def _distribution(
    ax: Any, by_round: Mapping[int, Sequence[float]], color: str, unit_scale: float
) -> None:
    rounds = list(by_round)
    data = [[v * unit_scale for v in by_round[r]] for r in rounds]
    ax.boxplot(
        data,
        positions=range(len(rounds)),
        widths=0.55,
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": color, "alpha": 0.25, "edgecolor": color},
        medianprops={"color": color, "linewidth": 1.6},
        whiskerprops={"color": color},
        capprops={"color": color},
    )
    for i, vals in enumerate(data):
        if len(vals) <= 400:  # every point while it stays legible, the box alone past that
            n = len(vals)
            xs = [i + 0.3 * ((k * 0.618034) % 1.0 - 0.5) for k in range(n)]
            ax.scatter(xs, vals, s=7, color=color, alpha=0.6, lw=0, zorder=3)
    ax.set_xticks(range(len(rounds)), [str(r) for r in rounds])
    ax.set_xlabel("round")
    ax.set_ylim(bottom=0)


@_styled
def upload_latency_plot(by_round: Mapping[int, Sequence[float]]) -> str:
    """Upload call duration per round: box (quartiles, 1.5 IQR whiskers) and the points."""
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    _distribution(ax, by_round, COLORS["upload"], 1000.0)
    ax.set_ylabel("upload call (ms)")
    ax.set_title("Upload latency per round (each leaf's upload call, retries included)", loc="left")
    return _svg(fig)


@_styled
def notification_latency_plot(
    waits: Mapping[int, Sequence[float]], fanout: Mapping[int, Sequence[float]]
) -> str:
    """Per round: upload -> notified (what a leaf waits) and the notification fan-out."""
    fig = _figure(10.0, 2.8)
    left, right = fig.subplots(1, 2)
    if waits:
        _distribution(left, waits, "#d97706", 1.0)
    left.set_ylabel("seconds")
    left.set_title("Upload -> notified of the aggregate (s)", loc="left")
    if fanout:
        _distribution(right, fanout, COLORS["notification"], 1000.0)
    right.set_ylabel("ms")
    right.set_title("Fan-out: first leaf notified -> each leaf (ms)", loc="left")
    return _svg(fig)


@_styled
def timeline_plot(
    spans: Sequence[Span],
    marks: Sequence[Mark],
    faults: Sequence[FaultSpan],
    leaves: Sequence[int],
    round_closes: Mapping[int, float],
    x_from: float = 0.0,
) -> str:
    """One row per leaf: prepare, upload, wait for the aggregate, download; faults shaded."""
    row = {leaf: i for i, leaf in enumerate(leaves)}
    fig = _figure(10.0, 1.3 + 0.2 * max(len(leaves), 4))
    ax = fig.add_subplot()
    min_w = _min_width(faults, [sp.start for sp in spans] + [sp.end for sp in spans])
    _shade_faults(ax, faults, min_w)
    for f in faults:
        for leaf in f.leaves:
            if leaf in row:
                ax.broken_barh(
                    [(f.start, max(f.end - f.start, min_w))],
                    (row[leaf] - 0.5, 1.0),
                    color=COLORS["fault"],
                    alpha=0.45,
                    lw=0,
                )
    by_kind: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for s in spans:
        if s.leaf in row:
            by_kind.setdefault((s.kind, row[s.leaf]), []).append(
                (s.start, max(s.end - s.start, 0.004))
            )
    height = {"prepare": 0.5, "upload": 0.7, "wait": 0.35, "download": 0.7}
    for (kind, y), xr in by_kind.items():
        h = height.get(kind, 0.6)
        ax.broken_barh(xr, (y - h / 2, h), color=COLORS.get(kind, "#999"), lw=0)
    seen: Counter[str] = Counter()
    for m in marks:
        if m.leaf in row and m.kind in _MARKERS:
            marker, size = _MARKERS[m.kind]
            ax.plot(
                [m.t], [row[m.leaf]], marker=marker, ms=size, color=COLORS[m.kind], lw=0, zorder=4
            )
            seen[m.kind] += 1
    for r, t in round_closes.items():
        ax.axvline(t, color="#6b7280", lw=0.8, ls=":")
        ax.annotate(
            f"R{r}",
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize=7,
            color="#4b5563",
        )
    ax.set_yticks(range(len(leaves)), [f"leaf {leaf}" for leaf in leaves])
    ax.tick_params(axis="y", labelsize=7 if len(leaves) > 25 else 8)
    ax.set_ylim(len(leaves) - 0.5, -0.5)
    ax.set_xlabel("seconds since run start")
    ax.grid(axis="y", visible=False)
    ax.set_xlim(left=x_from)
    handles: list[Any] = [
        Patch(color=COLORS[k], label=label)
        for k, label in (
            ("prepare", "generate + encode"),
            ("upload", "upload"),
            ("wait", "wait for aggregate"),
            ("download", "download"),
        )
    ]
    names = {
        "notified": "notified",
        "leaf_error": "leaf error",
        "leaf_died": "leaf died",
        "round_skipped": "skipped round",
        "disconnect": "disconnect",
        "give_up": "gave up reconnecting",
    }
    for k in names:
        if seen[k] or k == "notified":
            marker, size = _MARKERS[k]
            handles.append(
                Line2D([], [], marker=marker, ms=size * 0.8, color=COLORS[k], lw=0, label=names[k])
            )
    if faults:
        handles.append(Patch(color=COLORS["fault"], alpha=0.2, label="fault injected"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 9), fontsize=8)
    return _svg(fig)


@_styled
def reconnect_plot(
    events: Sequence[Mapping[str, Any]],
    t0: float,
    faults: Sequence[FaultSpan],
    leaf_ids: Mapping[str, int],
    max_points: int = 2000,
    x_from: float = 0.0,
) -> str:
    """Connects, disconnects and reconnect waits over time: per leaf, or counted past 2,000."""
    fig = _figure(10.0, 1.6 + 0.09 * min(max(len(leaf_ids), 10), 40))
    ax = fig.add_subplot()
    _shade_faults(ax, faults, _min_width(faults, [float(e["t"]) - t0 for e in events]))
    kinds = [
        k
        for k in ("connect", "disconnect", "reconnect_wait", "connect_failed", "give_up")
        if any(e.get("kind") == k for e in events)
    ]
    marker = {
        "connect": "o",
        "disconnect": "v",
        "reconnect_wait": "s",
        "connect_failed": "x",
        "give_up": "X",
    }
    if len(events) <= max_points:
        for k in kinds:
            pts = [
                (float(e["t"]) - t0, e.get("leaf", leaf_ids.get(str(e.get("leaf_id")), -1)))
                for e in events
                if e.get("kind") == k
            ]
            ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                s=14,
                marker=marker[k],
                color=COLORS[k],
                label=k.replace("_", " "),
                zorder={"disconnect": 6, "give_up": 6, "connect_failed": 5}.get(k, 4),
            )
        ax.set_ylabel("leaf")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.invert_yaxis()
    else:
        end = max(float(e["t"]) for e in events) - t0
        width = max(end / 80, 0.25)
        n = int(end // width) + 1
        for k in kinds:
            counts = [0] * n
            for e in events:
                if e.get("kind") == k:
                    counts[min(int((float(e["t"]) - t0) // width), n - 1)] += 1
            ax.step(
                [i * width for i in range(n)],
                counts,
                where="post",
                color=COLORS[k],
                label=k.replace("_", " "),
            )
        ax.set_ylabel(f"events per {width:.2g} s")
    ax.set_xlabel("seconds since run start")
    ax.set_xlim(left=x_from)
    ax.set_title("Notification transport: connects, disconnects, reconnect waits", loc="left")
    fig.legend(loc="outside upper right", fontsize=8, ncols=max(len(kinds), 1))
    return _svg(fig)


@_styled
def retries_plot(statuses: Mapping[str, Counter[str]], retries: Counter[str]) -> str:
    """HTTP attempts per endpoint by status (left) and retry waits by cause (right)."""
    fig = _figure(10.0, 0.9 + 0.32 * max(len(statuses), 3))
    left, right = fig.subplots(1, 2, width_ratios=[3, 1.3])
    labels = sorted({s for c in statuses.values() for s in c}, key=lambda s: (not s.isdigit(), s))

    shades = {
        "2": ("#15803d", "#86efac", "#4ade80"),
        "3": ("#0e7490", "#67e8f9", "#22d3ee"),
        "4": ("#d97706", "#fde68a", "#fbbf24"),
        "5": ("#b91c1c", "#fca5a5", "#ef4444"),
    }
    seen_in_class: Counter[str] = Counter()
    palette: dict[str, str] = {}
    for s in sorted({*labels, *retries}, key=lambda s: (not s.isdigit(), s)):
        cls = s[:1] if s.isdigit() else ""
        # One hue per class (2xx green, 3xx teal, 4xx amber, 5xx red), a shade per code.
        palette[s] = shades[cls][seen_in_class[cls] % 3] if cls in shades else "#4b5563"
        seen_in_class[cls] += 1

    def color(s: str) -> str:
        return palette.get(s, "#4b5563")

    endpoints = list(statuses)
    lefts = [0.0] * len(endpoints)
    for s in labels:
        vals = [float(statuses[ep].get(s, 0)) for ep in endpoints]
        left.barh(endpoints, vals, left=lefts, color=color(s), label=s, height=0.6)
        lefts = [a + b for a, b in zip(lefts, vals, strict=True)]
    for y, total in enumerate(lefts):
        left.annotate(
            f"{int(total)}",
            xy=(total, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            color="#374151",
        )
    left.invert_yaxis()
    left.set_xlabel("HTTP attempts")
    left.set_title("HTTP attempts by endpoint and status", loc="left")
    left.grid(axis="y", visible=False)
    if labels:
        fig.legend(
            *left.get_legend_handles_labels(),
            title="HTTP status",
            fontsize=8,
            title_fontsize=8,
            loc="outside lower center",
            ncols=min(len(labels), 10),
        )
    right.set_title("Retries by cause", loc="left")
    if retries:
        keys = sorted(retries)
        right.bar(keys, [retries[k] for k in keys], color=[color(k) for k in keys])
        right.set_ylabel("retry waits")
        right.yaxis.set_major_locator(MaxNLocator(integer=True))
    else:
        right.text(
            0.5,
            0.5,
            "no retries",
            ha="center",
            va="center",
            transform=right.transAxes,
            color="#6b7280",
        )
        right.set_xticks([])
        right.set_yticks([])
        right.grid(False)
    return _svg(fig)


def _byte_unit(peak: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB/s"), (1e6, "MB/s"), (1e3, "kB/s")):
        if peak >= scale:
            return scale, unit
    return 1.0, "B/s"


@_styled
def throughput_plot(
    upload: tuple[Sequence[float], Sequence[float], float],
    download: tuple[Sequence[float], Sequence[float], float],
    faults: Sequence[FaultSpan],
    x_from: float = 0.0,
) -> str:
    """Upload (and download) bytes per second over the run."""
    fig = _figure(10.0, 2.6)
    ax = fig.add_subplot()
    _shade_faults(ax, faults)
    peak = max([*upload[1], *download[1], 1.0])
    scale, unit = _byte_unit(peak)
    for (xs, ys, _), label, c in (
        (upload, "uploaded", COLORS["upload"]),
        (download, "downloaded", COLORS["download"]),
    ):
        if xs:
            ax.step(xs, [y / scale for y in ys], where="post", color=c, label=label, lw=1.3)
            ax.fill_between(xs, [y / scale for y in ys], step="post", color=c, alpha=0.12, lw=0)
    width = upload[2] or download[2]
    ax.set_ylabel(unit)
    ax.set_xlabel("seconds since run start")
    ax.set_xlim(left=x_from)
    ax.set_ylim(bottom=0)
    ax.set_title(f"Throughput (bytes per second, {width:.2g} s bins)", loc="left")
    ax.legend(loc="upper right", fontsize=8)
    return _svg(fig)


def _bar_height(rel_error: Any) -> float:
    """A log-scale bar: no error drawn at the floor, an infinite one (a NaN aggregate in a
    results.json written before it was made null) at 1 (100 %), never an infinite axis."""
    if not isinstance(rel_error, (int, float)) or math.isnan(rel_error):
        return 1e-17
    return 1.0 if math.isinf(rel_error) else max(float(rel_error), 1e-17)


@_styled
def round_error_plot(rounds: Sequence[Mapping[str, Any]]) -> str:
    """Max relative error of every round's aggregate (log scale), failed rounds in red."""
    fig = _figure(min(7.5, 3.0 + 0.35 * len(rounds)), 2.4)
    ax = fig.add_subplot()
    xs = [str(r.get("round")) for r in rounds]
    ys = [_bar_height(r.get("max_rel_error")) for r in rounds]
    ax.bar(xs, ys, color=["#16a34a" if r.get("passed") else "#dc2626" for r in rounds], width=0.6)
    ax.set_yscale("log")
    ax.set_ylim(bottom=min(ys) / 10, top=max(ys) * 3)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("round")
    ax.set_ylabel("max relative error")
    ax.set_title("Aggregate error per round (green passed, red failed)", loc="left")
    return _svg(fig)


@_styled
def memory_plot(processes: Sequence[Mapping[str, Any]], s_bytes: int) -> str:
    """RSS of each process over the run (issue 17), with each one's bound drawn dashed."""
    fig = _figure(10.0, 3.2)
    ax = fig.add_subplot()
    s_mib = s_bytes / 2**20
    for i, p in enumerate(processes):
        pts = p.get("timeline") or []
        if not pts:
            continue
        color = f"C{i % 10}"
        ax.plot([t for t, _ in pts], [m for _, m in pts], color=color, lw=1.2, label=p["name"])
        limit = p.get("limit_x_S")
        if limit and s_bytes > 1:
            bound = p["at_rest_bytes"] / 2**20 + limit * s_mib
            ax.axhline(bound, color=color, lw=0.8, ls="--", alpha=0.6)
    ax.set_ylabel("RSS, MiB")
    ax.set_xlabel("seconds since sampling started")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"Resident memory per process (S = one decoded upload = {s_mib:.1f} MiB; "
        "dashed: at rest + the 3 x S bound)",
        loc="left",
    )
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    return _svg(fig)
