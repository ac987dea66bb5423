"""``report.html``: one self-contained page (inline CSS and SVG, nothing fetched).

Verdict first, then what failed and the forensics in words, the key figures, an optional
comparison with another run, the checks, every round's correctness table and the plots.
Every piece of run data goes through ``html.escape``; only our own markup and the SVG that
matplotlib produced are inserted raw.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from bk_sim.report._compare import Delta, scenario_mismatch
from bk_sim.report._implementations import implementations_html
from bk_sim.report._load import RunData
from bk_sim.report._metrics import FaultSpan
from bk_sim.report._summary import headline

_BAD = ' class="bad"'


def esc(value: Any) -> str:
    """Text for HTML content or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(x: Any, fmt: str = ".3g", unit: str = "") -> str:
    if not isinstance(x, (int, float)):
        return "–"
    text = f"{x:{fmt}}{unit}"
    # "-0.0000" reads as a sign that means something; it is only rounding.
    if text.startswith("-") and not any(c in text[1:] for c in "123456789"):
        return text[1:]
    return text


def _durations(values: Sequence[Any]) -> str:
    """Several durations in one unit: "20.2 / 36.4 / 41.2 ms" or "1.58 / 18.3 s"."""
    nums = [v for v in values if isinstance(v, (int, float))]
    if not nums:
        return "–"
    if max(nums) >= 1.0:
        return " / ".join(_num(v, ".3g") for v in values) + " s"
    return (
        " / ".join(
            _num(
                v * 1000 if isinstance(v, (int, float)) else None,
                ".0f" if v * 1000 >= 100 else ".1f",
            )
            if isinstance(v, (int, float))
            else "–"
            for v in values
        )
        + " ms"
    )


_CSS = """
:root { --ok:#15803d; --ok-bg:#dcfce7; --bad:#b91c1c; --bad-bg:#fee2e2; --ink:#111827;
  --muted:#6b7280; --line:#e5e7eb; --card:#ffffff; --page:#f3f4f6; }
* { box-sizing: border-box; }
body { margin:0; background:var(--page); color:var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 48px; }
header.verdict { border-radius: 10px; padding: 18px 22px; margin-bottom: 18px;
  border-left: 8px solid; background: var(--card); }
header.pass { border-color: var(--ok); } header.fail { border-color: var(--bad); }
.badge { display:inline-block; font-weight:700; letter-spacing:.06em; padding:3px 10px;
  border-radius:999px; font-size:13px; vertical-align: middle; margin-right: 10px; }
.pass .badge, .badge.pass { background:var(--ok-bg); color:var(--ok); }
.fail .badge, .badge.fail { background:var(--bad-bg); color:var(--bad); }
h1 { display:inline; font-size:22px; vertical-align: middle; }
.why { font-size:16px; margin:10px 0 6px; overflow-wrap:anywhere; }
.meta { color:var(--muted); font-size:12.5px; margin:0; }
section { background:var(--card); border-radius:10px; padding:16px 20px; margin-bottom:18px; }
h2 { font-size:17px; margin:0 0 10px; }
h3 { font-size:14.5px; margin:18px 0 6px; }
p.note { color:var(--muted); font-size:12.5px; margin:4px 0 8px; }
table { border-collapse: collapse; width:100%; font-size:13px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line);
  vertical-align: top; overflow-wrap:break-word; }
th { white-space: nowrap; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td.n, th.n { text-align:right; font-variant-numeric: tabular-nums; white-space:nowrap; }
tr.bad td { background:#fff5f5; }
.ok { color:var(--ok); font-weight:600; } .no { color:var(--bad); font-weight:700; }
.tiles { display:grid; grid-template-columns: repeat(auto-fill, minmax(215px, 1fr)); gap:10px; }
.tile { border:1px solid var(--line); border-radius:8px; padding:8px 12px; }
.tile .k { color:var(--muted); font-size:12px; }
.tile .v { font-size:17px; font-weight:600; white-space:nowrap; }
.tile.badv { border-color:#fca5a5; background:#fff5f5; }
.failure { border:1px solid #fecaca; background:#fff7f7; border-radius:8px; padding:10px 14px;
  margin:8px 0; }
.failure .name { font-weight:700; color:var(--bad); }
.round { border-top: 1px solid var(--line); padding-top: 4px; }
.plot svg { max-width:100%; height:auto; display:block; }
th.r { width: 70px; }
.plot { margin: 6px 0 16px; }
code { font-size:12px; background:#f3f4f6; padding:1px 4px; border-radius:4px; }
footer { color:var(--muted); font-size:12px; text-align:center; }
"""


def _leaf_name(lid: str, names: Mapping[str, int]) -> str:
    return f"leaf {names[lid]}" if lid in names else lid[:8]


def _forensics_html(
    f: Mapping[str, Any], names: Mapping[str, int], limit: int = 12, summary: bool = True
) -> str:
    """The forensics in words, then the leaves whose weight was off (and a few others)."""
    parts = [f"<p>{esc(f.get('summary') or 'No forensics summary.')}</p>"] if summary else []
    words = []
    for key, what in (
        ("dropped", "dropped (weight near zero)"),
        ("double_counted", "counted twice"),
        ("misweighted", "given the wrong weight"),
    ):
        ids = f.get(key) or []
        if ids:
            who = ", ".join(_leaf_name(i, names) for i in ids[:20])
            more = f" and {len(ids) - 20} more" if len(ids) > 20 else ""
            words.append(f"<li><b>{esc(what)}</b>: {esc(who + more)}</li>")
    if f.get("unweighted"):
        words.append("<li><b>weightings ignored</b>: the aggregate is a plain mean</li>")
    if f.get("stale_of"):
        words.append(f"<li><b>stale</b>: the aggregate is that of {esc(f['stale_of'])}</li>")
    if words:
        parts.append("<ul>" + "".join(words) + "</ul>")
    eff: Mapping[str, float] = f.get("effective_weights") or {}
    exp: Mapping[str, float] = f.get("expected_weights") or {}
    if eff and exp:
        flagged = {
            *(f.get("dropped") or []),
            *(f.get("double_counted") or []),
            *(f.get("misweighted") or []),
        }
        order = sorted(exp, key=lambda i: (i not in flagged, -abs(eff.get(i, 0) - exp[i])))
        shown = order[:limit]
        rows = []
        for lid in shown:
            e, x = eff.get(lid), exp[lid]
            ratio = e / x if isinstance(e, (int, float)) and x else None
            verdict = (
                "dropped"
                if lid in (f.get("dropped") or [])
                else "counted twice"
                if lid in (f.get("double_counted") or [])
                else "wrong weight"
                if lid in (f.get("misweighted") or [])
                else "ok"
            )
            cls = ' class="bad"' if verdict != "ok" else ""
            rows.append(
                f"<tr{cls}><td>{esc(_leaf_name(lid, names))}</td><td><code>{esc(lid)}</code></td>"
                f"<td class='n'>{_num(x, '.4f')}</td><td class='n'>{_num(e, '.4f')}</td>"
                f"<td class='n'>{_num(ratio, '.2f')}</td>"
                f"<td class='{'no' if verdict != 'ok' else 'ok'}'>{esc(verdict)}</td></tr>"
            )
        note = (
            f"<p class='note'>{len(order) - len(shown)} more leaves not shown "
            "(their effective weight is closest to the expected one).</p>"
            if len(order) > len(shown)
            else ""
        )
        if f.get("dropped") and len(order) > len(f.get("dropped") or []):
            note += (
                "<p class='note'>The other leaves' weights rise together because the "
                "aggregate is normalised over the leaves it kept.</p>"
            )
        parts.append(
            "<table><tr><th>leaf</th><th>id</th><th class='n'>expected weight</th>"
            "<th class='n'>effective weight</th><th class='n'>ratio</th><th>verdict</th></tr>"
            + "".join(rows)
            + "</table>"
            + note
        )
    return "".join(parts)


def _sentence(text: str) -> str:
    """Capitalised, with a full stop (the message may already end with one)."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _header(run: RunData) -> str:
    r = run.results
    passed = bool(r.get("passed"))
    sc = r.get("scenario") or {}
    meta = r.get("run") or {}
    plat = sc.get("platform") or {}
    leaves = (sc.get("leaves") or {}).get("count")
    started = meta.get("started_at") or ""
    items = [
        f"run <code>{esc(run.name)}</code>",
        f"started {esc(str(started)[:19].replace('T', ' '))} UTC" if started else "",
        f"took {_num(meta.get('duration_s'), '.1f', ' s')}",
        f"{esc(leaves)} leaves" if leaves is not None else "",
        f"{esc(sc.get('rounds'))} rounds" if sc.get("rounds") is not None else "",
        f"transport {esc(sc.get('transport'))}" if sc.get("transport") else "",
        "federated analytics"
        if (sc.get("payload") or {}).get("kind") == "federated_analytics"
        else f"strategy {esc(plat.get('strategy'))}"
        if plat.get("strategy")
        else "",
        f"exit code {esc(r.get('exit_code'))}",
    ]
    if meta.get("interrupted"):
        items.append("<b>interrupted</b>")
    cls = "pass" if passed else "fail"
    return (
        f"<header class='verdict {cls}'><span class='badge'>{'PASSED' if passed else 'FAILED'}"
        f"</span><h1>{esc(sc.get('name') or run.name)}</h1>"
        f"<p class='why'>{esc(_sentence(headline(r)))}</p>"
        f"<p class='meta'>{' · '.join(i for i in items if i)}</p></header>"
    )


def _failures(run: RunData, names: Mapping[str, int]) -> str:
    r = run.results
    failed = [c for c in r.get("checks") or [] if not c.get("passed")]
    if not failed:
        return ""
    by_round = {f"round {x.get('round')}": x for x in r.get("rounds") or []}
    out = ["<section><h2>What failed</h2>"]
    shown_forensics = False
    for c in failed:
        name = str(c.get("name") or "")
        out.append(
            f"<div class='failure'><div class='name'>{esc(name)}</div>"
            f"<div>{esc(c.get('message') or '')}</div>"
        )
        key = name.split(":", 1)[0]
        rnd = by_round.get(key)
        if rnd and rnd.get("forensics"):
            if not shown_forensics:
                out.append("<h3>Forensics: the weight each leaf got in the aggregate</h3>")
                out.append(_forensics_html(rnd["forensics"], names, summary=False))
                shown_forensics = True
            else:
                out.append(
                    f"<p class='note'>Forensics table under {esc(key.capitalize())} below.</p>"
                )
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _tiles(run: RunData, metrics: Mapping[str, float | None]) -> str:
    r = run.results
    t = r.get("timings") or {}
    n = r.get("notifications") or {}
    lv = r.get("leaves") or {}
    tiles: list[tuple[str, str, bool]] = [
        (
            "upload p50 / p95 / p99",
            _durations([metrics.get(f"upload latency p{q} (s)") for q in (50, 95, 99)]),
            False,
        ),
        (
            "notification p50 / p99",
            _durations([metrics.get(f"notification latency p{q} (s)") for q in (50, 99)]),
            False,
        ),
        (
            "notifications received",
            f"{n.get('received', 0)} / {n.get('expected', 0)}",
            bool(n.get("lost") or n.get("duplicates")),
        ),
        (
            "leaves finished",
            f"{lv.get('completed', 0)} / {lv.get('count', 0)}"
            + (f" (+{lv['died_as_planned']} died)" if lv.get("died_as_planned") else ""),
            bool(lv.get("errors")),
        ),
        (
            "HTTP retries",
            _num(metrics.get("HTTP retries"), ".0f"),
            bool(metrics.get("HTTP retries")),
        ),
        ("disconnects", _num(metrics.get("disconnects"), ".0f"), bool(metrics.get("disconnects"))),
        (
            "round wall time (mean)",
            _num(metrics.get("round wall time mean (s)"), ".2f", " s"),
            False,
        ),
        ("leaves connected after", _num(t.get("leaves_connected_s"), ".2f", " s"), False),
        ("harness share of a round", _num(t.get("harness_share"), ".1%"), False),
    ]
    cells = "".join(
        f"<div class='tile{' badv' if bad else ''}'><div class='k'>{esc(k)}</div>"
        f"<div class='v'>{esc(v)}</div></div>"
        for k, v, bad in tiles
    )
    return f"<section><h2>Key figures</h2><div class='tiles'>{cells}</div></section>"


def _compare(current: RunData, baseline: RunData, deltas: Sequence[Delta]) -> str:
    regs = sum(1 for d in deltas if d.regression)
    mismatch = scenario_mismatch(baseline, current)
    rows = []
    for d in deltas:
        status = (
            "<span class='no'>worse</span>"
            if d.regression
            else "<span class='ok'>better</span>"
            if d.improvement
            else ""
        )
        cls = " class='bad'" if d.regression else ""
        rows.append(
            f"<tr{cls}><td>{esc(d.name)}</td><td class='n'>{esc(d.show(d.baseline))}</td>"
            f"<td class='n'>{esc(d.show(d.current))}</td><td class='n'>{esc(d.change)}</td>"
            f"<td>{status}</td></tr>"
        )
    b_pass = "PASSED" if baseline.results.get("passed") else "FAILED"
    return (
        f"<section><h2>Compared with {esc(baseline.name)}</h2>"
        f"<p>{regs} regression{'s' if regs != 1 else ''} against the baseline "
        f"<code>{esc(baseline.dir)}</code> ({esc(b_pass)}: {esc(headline(baseline.results))}). "
        "Latency and wall time count as worse past +20 % and +5 ms; counts on any increase; "
        "the relative error at 10x."
        + (f" <b>Note: {esc(mismatch)}.</b>" if mismatch else "")
        + "</p>"
        f"<table><tr><th>figure</th><th class='n'>baseline {esc(baseline.name)}</th>"
        f"<th class='n'>this run {esc(current.name)}</th><th class='n'>change</th><th></th></tr>"
        + "".join(rows)
        + "</table></section>"
    )


def _checks(run: RunData) -> str:
    rows = "".join(
        f"<tr{'' if c.get('passed') else _BAD}>"
        f"<td class='{'ok' if c.get('passed') else 'no'}'>{'pass' if c.get('passed') else 'FAIL'}"
        f"</td><td>{esc(c.get('name'))}</td><td>{esc(c.get('message') or '')}</td></tr>"
        for c in run.results.get("checks") or []
    )
    return (
        "<section><h2>Checks</h2><table>"
        "<tr><th class='r'>result</th><th>check</th><th>detail</th></tr>"
        f"{rows}</table><p class='note'>The same checks are test cases in "
        "<code>junit.xml</code>.</p></section>"
    )


def _rounds(run: RunData, names: Mapping[str, int], error_plot: str) -> str:
    rounds = run.results.get("rounds") or []
    if not rounds:
        return (
            "<section><h2>Rounds</h2><p>No round was judged (no aggregate was produced or "
            "the run stopped early).</p></section>"
        )
    out = [
        "<section><h2>Rounds: is every aggregate correct?</h2>",
        f"<div class='plot'>{error_plot}</div>",
    ]
    for r in rounds:
        ok = bool(r.get("passed"))
        out.append(
            f"<div class='round'><h3>Round {esc(r.get('round'))} "
            f"<span class='badge {'pass' if ok else 'fail'}'>{'correct' if ok else 'WRONG'}</span>"
            "</h3><p class='note'>"
            f"{esc(r.get('uploads'))} uploads · strategy {esc(r.get('strategy'))} · closed by "
            f"{esc(r.get('close_reason'))} · wall time {_num(r.get('wall_time_s'), '.2f', ' s')} · "
            f"aggregation <code>{esc(r.get('aggregation_id'))}</code></p>"
        )
        if not ok and r.get("reason"):
            out.append(f"<p class='no'>{esc(r.get('reason'))}</p>")
        layers = r.get("layers") or []
        if layers:
            out.append(
                "<table><tr><th>layer</th><th>shape</th><th>dtype</th>"
                "<th class='n'>max abs error</th><th class='n'>max rel error</th>"
                "<th>within tolerance</th></tr>"
            )
            for lay in layers:
                lok = bool(lay.get("passed"))
                shape = "×".join(str(s) for s in lay.get("shape") or []) or "scalar"
                out.append(
                    f"<tr{'' if lok else _BAD}><td>{esc(lay.get('index'))}</td>"
                    f"<td>{esc(shape)}</td><td>{esc(lay.get('dtype'))}</td>"
                    f"<td class='n'>{_num(lay.get('max_abs_error'))}</td>"
                    f"<td class='n'>{_num(lay.get('max_rel_error'))}</td>"
                    f"<td class='{'ok' if lok else 'no'}'>{'yes' if lok else 'NO'}</td></tr>"
                )
            out.append("</table>")
        if r.get("forensics"):
            out.append("<h3>Forensics</h3>" + _forensics_html(r["forensics"], names, limit=6))
        elif ok:
            out.append(
                "<p class='note'>Forensics not needed: every layer matches the "
                "reference within tolerance.</p>"
            )
        out.append("</div>")
    out.append("</section>")
    return "".join(out)


def _faults_table(faults: Sequence[FaultSpan]) -> str:
    if not faults:
        return ""
    rows = []
    for f in faults:
        who = "all (run-wide)" if f.run_wide else ", ".join(f"leaf {x}" for x in f.leaves[:12])
        if len(f.leaves) > 12:
            who += f" and {len(f.leaves) - 12} more"
        status = f.error or ("" if f.ended else "no fault_end: drawn to the end of the log")
        rows.append(
            f"<tr{_BAD if f.error else ''}><td>{esc(f.label)}</td><td>{esc(f.kind)}</td>"
            f"<td>{esc(f.target)}</td><td>{esc(who)}</td>"
            f"<td class='n'>{_num(f.start, '.2f', ' s')}</td>"
            f"<td class='n'>{_num(f.end - f.start, '.2f', ' s')}</td><td>{esc(status)}</td></tr>"
        )
    return (
        f"<h3>Faults injected ({len(faults)})</h3><table><tr><th>fault</th><th>kind</th>"
        "<th>target</th><th>leaves</th><th class='n'>from</th><th class='n'>lasted</th>"
        "<th>note</th></tr>" + "".join(rows) + "</table>"
        "<p class='note'>Shaded red in the plots below (times in seconds since run start).</p>"
    )


def render_html(
    run: RunData,
    *,
    names: Mapping[str, int],
    metrics: Mapping[str, float | None],
    plots: Mapping[str, str],
    notes: Mapping[str, str],
    comparison: tuple[RunData, Sequence[Delta]] | None = None,
    faults: Sequence[FaultSpan] = (),
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    rounds_html: str | None = None,
) -> str:
    """The whole page. ``plots`` maps a section key to inline SVG, ``notes`` to a caption;
    ``rounds_html`` replaces the rounds section (federated analytics has its own)."""

    def plot(key: str, title: str) -> str:
        note = notes.get(key)
        body = plots.get(key)
        inner = f"<div class='plot'>{body}</div>" if body else ""
        return (
            f"<h3>{esc(title)}</h3>" + (f"<p class='note'>{esc(note)}</p>" if note else "") + inner
        )

    verdict = "PASSED" if run.results.get("passed") else "FAILED"
    title = f"{verdict} · {(run.results.get('scenario') or {}).get('name') or run.name}"
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        _header(run),
        _failures(run, names),
        _tiles(run, metrics),
        _compare(run, *comparison) if comparison else "",
        _checks(run),
        implementations_html(run.results),
        rounds_html
        if rounds_html is not None
        else _rounds(run, names, plots.get("round_errors", "")),
        "<section><h2>What happened over time</h2>",
        _faults_table(faults),
        plot("timeline", "Per-leaf timeline"),
        plot("upload_latency", "Upload latency"),
        plot("notification_latency", "Notification latency"),
        plot("throughput", "Throughput"),
        plot("retries", "HTTP statuses and retries"),
        plot("reconnects", "Reconnect timeline"),
        plot("memory", "Memory per process"),
        "</section>",
        f"<footer>Rendered by <code>bk-sim report</code> from <code>events.jsonl</code> "
        f"({len(run.events)} events"
        + (f", {run.bad_lines} unreadable lines skipped" if run.bad_lines else "")
        + f") and <code>results.json</code> at {esc(now().strftime('%Y-%m-%d %H:%M UTC'))}."
        "</footer></main></body></html>",
    ]
    return "\n".join(p for p in parts if p)
