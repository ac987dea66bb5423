"""The report's federated-analytics rounds: verdict, forensics first, pooled statistics
and each column's pooled distribution against the per-site ones.

Input is results.json's ``analytics`` list (one entry per round: the judge's JSON, the
column histograms), so ``bk-sim report`` re-renders it from a run folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from bk_sim.report._html import _num, esc

#: Rounds that get a distribution plot (the others' histograms stay in results.json):
#: the failed ones, up to this many, else the last round (rounds redraw the same sites).
MAX_PLOTTED_ROUNDS = 2
_FORENSIC = frozenset(
    {"leaf_missing", "leaf_counted_twice", "counts", "mean_of_means", "non_finite"}
)
_FINDINGS_SHOWN = 15
_BAD = ' class="bad"'


def plotted_rounds(analytics: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rounds drawn: the first ``MAX_PLOTTED_ROUNDS`` failed ones, else the last."""
    drawable = [a for a in analytics if a.get("histograms")]
    failed = [a for a in drawable if not a.get("passed")]
    return failed[:MAX_PLOTTED_ROUNDS] if failed else drawable[-1:]


def analytics_plots(analytics: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """SVG per plotted round, keyed ``analytics_<round>``: one small plot per column."""
    from bk_sim.report._fa_plots import analytics_distribution_plot

    out: dict[str, str] = {}
    for a in plotted_rounds(analytics):
        hist = a["histograms"]
        out[f"analytics_{a.get('round')}"] = analytics_distribution_plot(
            hist, max_columns=max(12, len(hist))
        )
    return out


def _where(finding: Mapping[str, Any]) -> str:
    if finding.get("leaf"):
        return f"leaf {finding['leaf']}"
    return str(finding.get("field") or finding.get("column") or "")


def _findings(findings: Sequence[Mapping[str, Any]]) -> str:
    ordered = [f for f in findings if f.get("check") in _FORENSIC]
    ordered += [f for f in findings if f.get("check") not in _FORENSIC]
    rows = "".join(
        f"<tr{_BAD if f.get('check') in _FORENSIC else ''}><td>{esc(f.get('check'))}</td>"
        f"<td>{esc(_where(f))}</td>"
        f"<td>{esc(f.get('message'))}</td></tr>"
        for f in ordered[:_FINDINGS_SHOWN]
    )
    more = (
        f"<p class='note'>{len(ordered) - _FINDINGS_SHOWN} more findings in results.json.</p>"
        if len(ordered) > _FINDINGS_SHOWN
        else ""
    )
    return "<table><tr><th>finding</th><th>where</th><th>what</th></tr>" + rows + "</table>" + more


def _pooled(pooled: Mapping[str, Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td class='n'>{esc(p.get('sites'))}</td>"
        f"<td class='n'>{esc(p.get('count'))}</td><td class='n'>{esc(p.get('nan'))}</td>"
        f"<td class='n'>{_num(p.get('mean'), '.6g')}</td>"
        f"<td class='n'>{_num(p.get('std'), '.6g')}</td>"
        f"<td class='n'>{_num(p.get('min'), '.6g')}</td>"
        f"<td class='n'>{_num(p.get('max'), '.6g')}</td></tr>"
        for name, p in sorted(pooled.items())
    )
    return (
        "<details><summary>Pooled reference statistics per column</summary><table>"
        "<tr><th>column</th><th class='n'>sites</th><th class='n'>count</th>"
        "<th class='n'>NaN</th><th class='n'>mean</th><th class='n'>std</th>"
        "<th class='n'>min</th><th class='n'>max</th></tr>" + rows + "</table></details>"
    )


def analytics_section(
    analytics: Sequence[Mapping[str, Any]],
    rounds: Sequence[Mapping[str, Any]],
    plots: Mapping[str, str],
) -> str:
    """The "Rounds" section of an analytics run."""
    if not analytics:
        return (
            "<section><h2>Analytics rounds</h2><p>No round was judged (no aggregate was "
            "produced or the run stopped early).</p></section>"
        )
    by_round = {r.get("round"): r for r in rounds}
    out = [
        "<section><h2>Analytics rounds: is every combined field and statistic right?</h2>",
        "<p class='note'>Every combined field and every derived statistic of the round "
        "record against the pooled raw columns the judge regenerates from the seed: "
        "integers and extremes exact, float sums within the summation's error bound.</p>",
    ]
    for a in analytics:
        ok = bool(a.get("passed"))
        v = a.get("verdict") or {}
        r = by_round.get(a.get("round")) or {}
        derived = "checked" if a.get("derived_checked") else "not reported by the platform"
        out.append(
            f"<div class='round'><h3>Round {esc(a.get('round'))} "
            f"<span class='badge {'pass' if ok else 'fail'}'>{'correct' if ok else 'WRONG'}"
            "</span></h3><p class='note'>"
            f"{esc(a.get('uploads'))} uploads · {esc(v.get('checks', 0))} checks · "
            f"derived statistics {esc(derived)} · closed by {esc(r.get('close_reason'))} · "
            f"wall time {_num(r.get('wall_time_s'), '.2f', ' s')} · "
            f"aggregation <code>{esc(a.get('aggregation_id'))}</code></p>"
        )
        fault = a.get("platform_fault") or {}
        if fault.get("analytics"):
            who = fault.get("victim_leaf_id") or fault.get("victim_field") or ""
            out.append(
                f"<p class='note'>The platform applied the deliberate fault "
                f"<code>{esc(fault['analytics'])}</code>"
                + (f" (victim <code>{esc(who)}</code>)" if who else "")
                + ".</p>"
            )
        if not ok:
            out.append(f"<p class='no'>{esc(a.get('reason') or r.get('reason') or '')}</p>")
            if v.get("findings"):
                out.append("<h3>Forensics first, then the failed checks</h3>")
                out.append(_findings(v["findings"]))
        if v.get("pooled"):
            out.append(_pooled(v["pooled"]))
        svg = plots.get(f"analytics_{a.get('round')}")
        if svg:
            out.append(
                "<p class='note'>Each column's distribution: the pooled one in blue, per-site "
                "densities in grey (up to 30 sites, evenly chosen), over shared bins.</p>"
                f"<div class='plot'>{svg}</div>"
            )
        elif a.get("histograms"):
            out.append(
                "<p class='note'>This round's distributions are not drawn (the report draws "
                "the failed rounds, or else the last); its histograms are in results.json.</p>"
            )
        out.append("</div>")
    out.append("</section>")
    return "".join(out)
