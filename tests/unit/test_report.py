"""Reports from hand-made run folders: junit cases, escaping, faults, sampling, comparison.

A synthetic run folder (results.json + events.jsonl shaped like a real run's) lets each
test set up exactly the situation it checks, with no broker and no platform.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bk_sim.cli import main
from bk_sim.errors import ReportError
from bk_sim.report import headline, junit_tree, load_run, render_run, summary_lines
from bk_sim.report._compare import compare_runs
from bk_sim.report._metrics import (
    MAX_TIMELINE_LEAVES,
    fault_spans,
    notification_fanout,
    percentile,
    sample_leaves,
)

T0 = 1_800_000_000.0
SECRET = "sekret-session-token-6f1d"  # only ever in leaves.json: must never reach a report


def _checks(rounds: int, failed_rounds: set[int], extra: list[dict[str, Any]]) -> list[dict]:
    out = [
        {
            "name": f"round {r}: aggregate correct",
            "passed": r not in failed_rounds,
            "message": "" if r not in failed_rounds else "Leaf leaf 3 (id-3) was dropped.",
        }
        for r in range(1, rounds + 1)
    ]
    out.append(
        {
            "name": "notifications: every leaf notified once per round",
            "passed": True,
            "message": "0 lost, 0 duplicated",
        }
    )
    return out + extra


def write_run(
    root: Path,
    name: str = "synthetic-20260101T000000Z",
    *,
    leaves: int = 8,
    rounds: int = 2,
    failed_rounds: frozenset[int] = frozenset(),
    extra_checks: tuple[dict[str, Any], ...] = (),
    upload_s: float = 0.02,
    faults: bool = False,
    retries: bool = False,
    disconnects: bool = False,
) -> Path:
    """A run folder shaped like ``bk-sim run``'s, with the events the options ask for."""
    d = root / name
    d.mkdir(parents=True)
    ev: list[dict[str, Any]] = [
        {"kind": "run_started", "t": T0, "scenario": "synthetic"},
        {"kind": "leaves_spawning", "t": T0 + 1, "processes": 2, "leaves": leaves},
    ]
    for i in range(leaves):
        lid = f"id-{i}"
        ev.append({"kind": "leaf_started", "t": T0 + 1.2, "leaf": i, "leaf_id": lid})
        ev.append({"kind": "connect", "t": T0 + 1.3, "leaf_id": lid, "leaf": i, "attempt": 0})
    for r in range(1, rounds + 1):
        base = T0 + 2 + (r - 1) * 2
        agg = f"agg-{r}"
        for i in range(leaves):
            lid = f"id-{i}"
            end = base + 0.1 + upload_s + i * 1e-4
            ev.append(
                {
                    "kind": "http_request",
                    "t": end,
                    "leaf_id": lid,
                    "leaf": i,
                    "endpoint": "upload",
                    "method": "POST",
                    "status": 201,
                    "duration_s": upload_s,
                    "attempt": 1,
                }
            )
            ev.append(
                {
                    "kind": "upload",
                    "t": end,
                    "leaf": i,
                    "leaf_id": lid,
                    "round": r,
                    "bytes": 4000,
                    "begun": base,
                    "duration_s": upload_s,
                    "weighting": 1.0 + i,
                }
            )
            note = base + 1.0 + i * 1e-3
            ev.append(
                {
                    "kind": "notification",
                    "t": note,
                    "leaf_id": lid,
                    "leaf": i,
                    "message_type": "aggregation_status",
                    "value": agg,
                }
            )
            ev.append(
                {
                    "kind": "aggregate_notified",
                    "t": note + 0.001,
                    "leaf": i,
                    "leaf_id": lid,
                    "round": r,
                    "aggregation_id": agg,
                    "latency_s": note - end,
                }
            )
            ev.append(
                {
                    "kind": "download",
                    "t": note + 0.05,
                    "leaf": i,
                    "leaf_id": lid,
                    "round": r,
                    "bytes": 4000,
                    "duration_s": 0.02,
                }
            )
    if retries:
        for status in (503, 503, 429):
            ev.append(
                {
                    "kind": "http_request",
                    "t": T0 + 2.05,
                    "leaf_id": "id-1",
                    "leaf": 1,
                    "endpoint": "upload",
                    "status": status,
                    "duration_s": 0.01,
                    "attempt": 1,
                }
            )
            ev.append(
                {
                    "kind": "retry_wait",
                    "t": T0 + 2.06,
                    "leaf_id": "id-1",
                    "leaf": 1,
                    "endpoint": "upload",
                    "status": status,
                    "delay_s": 0.1,
                }
            )
    if disconnects:
        for kind, dt in (("disconnect", 0.0), ("reconnect_wait", 0.01), ("connect", 0.6)):
            ev.append({"kind": kind, "t": T0 + 2.5 + dt, "leaf_id": "id-2", "transport": "amqp"})
    if faults:
        # Shaped like bk_sim.chaos's events: the name in "fault", targets in "leaves".
        every = list(range(leaves))
        ev += [
            {
                "kind": "fault_start",
                "t": T0 + 2.4,
                "fault": "restart",
                "fault_kind": "restart_broker",
                "target": "broker",
                "leaves": every,
                "round": 1,
            },
            {
                "kind": "fault_end",
                "t": T0 + 3.1,
                "fault": "restart",
                "fault_kind": "restart_broker",
                "target": "broker",
            },
            {
                "kind": "fault_start",
                "t": T0 + 4.2,
                "fault": "kill-5",
                "fault_kind": "kill_leaf",
                "target": f"1 of {leaves} leaves",
                "leaves": [5],
                "round": 2,
            },
            {
                "kind": "fault_error",
                "t": T0 + 4.3,
                "fault": "kill-5",
                "fault_kind": "kill_leaf",
                "error": "<no such process>",
            },
        ]
    ev.append({"kind": "leaf_error", "t": T0 + 3.5, "leaf": 4, "leaf_id": "id-4", "error": "x"})
    ev.sort(key=lambda e: e["t"])
    with (d / "events.jsonl").open("w") as fh:
        for e in ev:
            fh.write(json.dumps(e) + "\n")
    checks = _checks(rounds, set(failed_rounds), list(extra_checks))
    passed = all(c["passed"] for c in checks)
    rounds_out = []
    for r in range(1, rounds + 1):
        bad = r in failed_rounds
        rounds_out.append(
            {
                "round": r,
                "aggregation_id": f"agg-{r}",
                "strategy": "fedavg",
                "close_reason": "all_uploaded",
                "uploads": leaves,
                "max_abs_error": 0.03 if bad else 1e-8,
                "max_rel_error": 20.0 if bad else 5e-8,
                "passed": not bad,
                "reason": "Leaf leaf 3 (id-3) was dropped." if bad else "",
                "wall_time_s": 1.2,
                "layers": [
                    {
                        "index": 0,
                        "shape": [16, 32],
                        "dtype": "float32",
                        "max_abs_error": 0.03 if bad else 1e-8,
                        "max_rel_error": 20.0 if bad else 5e-8,
                        "passed": not bad,
                    }
                ],
                "forensics": (
                    {
                        "summary": "Leaf leaf 3 (id-3) was dropped.",
                        "dropped": ["id-3"],
                        "double_counted": [],
                        "misweighted": [],
                        "unweighted": False,
                        "stale_of": None,
                        "effective_weights": {
                            f"id-{i}": (0.0 if i == 3 else 0.15) for i in range(8)
                        },
                        "expected_weights": {f"id-{i}": 0.125 for i in range(8)},
                    }
                    if bad
                    else None
                ),
            }
        )
    results = {
        "passed": passed,
        "exit_code": 0 if passed else 1,
        "verdict": "passed" if passed else "failed",
        "scenario": {"name": "synthetic", "rounds": rounds, "leaves": {"count": leaves}},
        "run": {"dir": str(d), "started_at": "2027-01-15T08:00:00+00:00", "duration_s": 9.5},
        "checks": checks,
        "rounds": rounds_out,
        "notifications": {"expected": leaves * rounds, "received": leaves * rounds, "lost": 0},
        "downloads": {"count": leaves * rounds},
        "leaves": {"count": leaves, "started": leaves, "completed": leaves, "errors": []},
        "timings": {
            "upload_latency_s": {"p50": upload_s, "p95": upload_s, "p99": upload_s},
            "notification_latency_s": {"p50": 0.004, "p99": 0.01},
        },
    }
    (d / "results.json").write_text(json.dumps(results))
    (d / "leaves.json").write_text(json.dumps([{"session_token": SECRET}]))
    return d


def _page(d: Path) -> str:
    return (d / "report.html").read_text(encoding="utf-8")


def test_junit_has_one_case_per_check_with_failures_by_name(tmp_path: Path) -> None:
    chaos = {"name": "chaos: no aggregation lost", "passed": False, "message": "round 2 lost"}
    d = write_run(tmp_path, failed_rounds=frozenset({1}), extra_checks=(chaos,))
    render_run(d)
    results = json.loads((d / "results.json").read_text())
    root = ET.parse(d / "junit.xml").getroot()
    suite = root.find("testsuite")
    assert suite is not None
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [c["name"] for c in results["checks"]]
    failed = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert set(failed) == {"round 1: aggregate correct", "chaos: no aggregation lost"}
    assert failed["chaos: no aggregation lost"].get("message") == "round 2 lost"
    assert suite.get("tests") == str(len(results["checks"])) == root.get("tests")
    assert suite.get("failures") == "2" and suite.get("errors") == "0"
    assert cases[0].get("classname") == "bk-sim.synthetic.round 1"


def test_junit_survives_control_characters_and_markup(tmp_path: Path) -> None:
    results = {
        "passed": False,
        "checks": [{"name": "weird <&> \x07 name", "passed": False, "message": "bad\x00 ]]>"}],
    }
    data = ET.tostring(junit_tree(results).getroot(), encoding="unicode")
    case = ET.fromstring(data).find("testsuite/testcase")
    assert case is not None and case.get("name") == "weird <&> ? name"
    assert case.find("failure").text == "bad? ]]>"  # type: ignore[union-attr]


def test_html_escapes_run_data_and_never_contains_secrets(tmp_path: Path) -> None:
    evil = {"name": "<script>alert(1)</script>", "passed": False, "message": '"><img src=x>'}
    d = write_run(tmp_path, extra_checks=(evil,))
    render_run(d)
    page = _page(d)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert SECRET not in page and SECRET not in (d / "junit.xml").read_text()


def test_html_is_self_contained(tmp_path: Path) -> None:
    d = write_run(tmp_path, faults=True, retries=True, disconnects=True)
    render_run(d)
    page = _page(d)
    assert page.count("<svg") == 7  # errors, timeline, upload, notification, throughput, ...
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:|//)""", page, re.I)
    assert "@import" not in page and not re.search(r"url\((?!#)", page) and "<link" not in page
    assert "<script" not in page


def test_failed_run_leads_with_failure_and_forensics(tmp_path: Path) -> None:
    d = write_run(tmp_path, failed_rounds=frozenset({2}))
    render_run(d)
    page = _page(d)
    verdict, failed, figures = (
        page.index("FAILED"),
        page.index("What failed"),
        page.index("Key figures"),
    )
    assert verdict < failed < figures
    top = page[:figures]
    assert "1 of 3 checks failed; first: round 2: aggregate correct" in top
    assert "dropped (weight near zero)" in top and "leaf 3" in top


def test_passed_run_says_why_in_one_sentence(tmp_path: Path) -> None:
    d = write_run(tmp_path)
    render_run(d)
    results = load_run(d).results
    assert summary_lines(results)[0] == "PASSED  " + headline(results)
    sentence = headline(results)
    assert sentence.startswith("all 3 checks passed: 2 of 2 rounds aggregated correctly")
    assert sentence[:1].upper() + sentence[1:] + "." in _page(d)


def test_faults_are_paired_and_shaded(tmp_path: Path) -> None:
    d = write_run(tmp_path, faults=True)
    run = load_run(d)
    spans = fault_spans(run.events, run.t0)
    assert [(f.label, f.leaves, f.run_wide) for f in spans] == [
        ("restart", (), True),  # every leaf targeted: the whole run
        ("kill-5", (5,), False),
    ]
    assert spans[0].start == pytest.approx(2.4) and spans[0].end == pytest.approx(3.1)
    assert spans[0].ended and not spans[1].ended
    assert spans[1].end == pytest.approx(max(e["t"] for e in run.events) - T0)
    assert spans[1].error == "<no such process>"
    render_run(d)
    page = _page(d)
    assert "Shaded red: 2 injected fault(s) (kill-5, restart)" in page
    assert "Faults injected (2)" in page and "&lt;no such process&gt;" in page
    assert "1 run-wide fault(s) (restart); leaf faults are on the timeline" in page


def test_retries_and_reconnects_are_plotted_when_present(tmp_path: Path) -> None:
    quiet = write_run(tmp_path, "quiet")
    render_run(quiet)
    assert "No disconnects: 8 connects" in _page(quiet)
    busy = write_run(tmp_path, "busy", retries=True, disconnects=True)
    render_run(busy)
    page = _page(busy)
    assert "1 disconnects, 1 reconnect waits, 9 connects." in page
    assert "3 retries." in page and ">503<" in page and ">429<" in page


def test_thousand_leaves_timeline_is_sampled_and_page_stays_small(tmp_path: Path) -> None:
    d = write_run(tmp_path, leaves=1000, rounds=3)
    began = time.perf_counter()
    rendered = render_run(d)
    took = time.perf_counter() - began
    page = _page(d)
    assert f"Showing {MAX_TIMELINE_LEAVES} of 1000 leaves" in page
    assert len(page) < 3_000_000, len(page)
    assert took < 20, took
    assert rendered.seconds == pytest.approx(took, abs=0.5)


def test_sample_leaves_keeps_notable_ones_and_the_limit() -> None:
    picked = sample_leaves(range(1000), notable=[7, 999, 500], limit=60)
    assert len(picked) == 60 and {7, 999, 500} <= set(picked)
    assert picked == sorted(picked)
    assert sample_leaves(range(10), notable=[]) == list(range(10))


def test_percentile_matches_numpy() -> None:
    values = [0.3, 0.01, 5.0, 2.2, 0.7, 0.7, 9.1]
    for q in (0, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_notification_fanout_is_relative_to_the_first_leaf(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, leaves=4, rounds=1))
    fan = notification_fanout(run.events)
    assert list(fan) == [1]
    assert fan[1] == pytest.approx([0.0, 0.001, 0.002, 0.003], abs=1e-6)


def test_compare_flags_slower_uploads_and_new_failures(tmp_path: Path) -> None:
    base = write_run(tmp_path, "base", upload_s=0.02)
    slow = write_run(tmp_path, "slow", upload_s=0.2, failed_rounds=frozenset({1}))
    deltas = {x.name: x for x in compare_runs(load_run(base), load_run(slow))}
    assert deltas["upload latency p95 (s)"].regression
    assert deltas["failed checks"].regression and deltas["verdict"].regression
    assert not deltas["notification latency p99 (s)"].regression
    same = {x.name: x for x in compare_runs(load_run(base), load_run(base))}
    assert not any(x.regression or x.improvement for x in same.values())
    rendered = render_run(slow, compare_to=base)
    assert rendered.compare_lines[0].startswith("compared with base: ")
    assert "  worse  upload latency p95 (s): 0.02 -> 0.2 +0.18 (x10)" in rendered.compare_lines
    assert "  worse  verdict: PASSED -> FAILED" in rendered.compare_lines
    page = _page(slow)
    assert "Compared with base" in page and "worse" in page
    other = write_run(tmp_path, "other")
    results = json.loads((other / "results.json").read_text())
    results["scenario"]["name"] = "retry_storm"
    (other / "results.json").write_text(json.dumps(results))
    lines = render_run(slow, compare_to=other).compare_lines
    assert lines[1] == (
        "  note: different scenarios (retry_storm vs synthetic): figures may not be comparable"
    )


def test_report_cli_renders_and_rejects_non_run_folders(tmp_path: Path) -> None:
    d = write_run(tmp_path)
    runner = CliRunner()
    ok = runner.invoke(main, ["report", str(d)])
    assert ok.exit_code == 0, ok.output
    assert ok.output.startswith("PASSED") and "report.html" in ok.output
    bad = runner.invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        f"bk-sim: {tmp_path}: not a run folder (no results.json)"
    ]
    other = runner.invoke(main, ["report", str(d), "--compare", str(tmp_path / "nope")])
    assert other.exit_code == 2 and "no such directory" in other.output


@pytest.mark.parametrize(
    ("content", "reason"),
    [("{not json", "unreadable results"), ('{"x": 1}', "not a bk-sim results file")],
)
def test_load_run_names_what_is_wrong(tmp_path: Path, content: str, reason: str) -> None:
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ReportError, match=reason) as info:
        load_run(tmp_path)
    assert info.value.exit_code == 2


def test_truncated_event_log_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    d = write_run(tmp_path)
    with (d / "events.jsonl").open("a") as fh:
        fh.write('{"kind": "upload", "t": 18000')  # a writer killed mid-line
    run = load_run(d)
    assert run.bad_lines == 1 and not math.isnan(run.t0)
    render_run(d)
    assert "1 unreadable lines skipped" in _page(d)


@pytest.mark.parametrize("blocked", ["report.html", "junit.xml"])
def test_a_run_folder_that_cannot_be_written_is_a_report_error(
    tmp_path: Path, blocked: str
) -> None:
    """(Root ignores permissions, so a folder where the file should go blocks the write.)"""
    d = write_run(tmp_path)
    (d / blocked).mkdir()
    (d / blocked / "keep").write_text("x")
    with pytest.raises(ReportError, match="cannot write the report") as info:
        render_run(d)
    assert info.value.exit_code == 2
    assert not list(d.glob(".*.tmp")), "a failed write left its temporary file"
    out = CliRunner().invoke(main, ["report", str(d)])
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert out.output.startswith(f"bk-sim: {d}: cannot write the report")


def test_ctrl_c_exits_2_not_clicks_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1 means a check failed: an interrupted command could not run, which is 2."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("bk_sim.cli._report.render_run", interrupted)
    out = CliRunner().invoke(main, ["report", str(write_run(tmp_path))])
    assert out.exit_code == 2, out.output
    assert out.output.strip() == "bk-sim: interrupted"


def test_an_unexpected_error_exits_2_with_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug is not a failed check: exit 2 (Python's default 1 would read as one)."""

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("bk_sim.cli._report.render_run", broken)
    out = CliRunner().invoke(main, ["report", str(write_run(tmp_path))])
    assert out.exit_code == 2, out.output
    assert "Traceback" in out.output and "RuntimeError: boom" in out.output
    assert out.output.strip().splitlines()[-1] == "bk-sim: internal error: RuntimeError: boom"


def test_a_past_run_with_an_infinite_round_error_still_renders(tmp_path: Path) -> None:
    """results.json of older runs held Infinity (a NaN aggregate): no infinite plot axis."""
    d = write_run(tmp_path, failed_rounds=frozenset({2}))
    results = json.loads((d / "results.json").read_text())
    results["rounds"][1]["max_rel_error"] = math.inf
    (d / "results.json").write_text(json.dumps(results))  # writes Infinity
    render_run(d)
    assert _page(d).count("<svg") >= 1
