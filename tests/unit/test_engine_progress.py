"""The run's status display: plain lines off a terminal, a live table on one."""

from __future__ import annotations

import io

from rich.console import Console

from bk_sim.engine import RunCounters, StatusBoard


def _counters() -> RunCounters:
    c = RunCounters()
    for e in (
        {"kind": "leaf_started"},
        {"kind": "connect", "attempt": 0},
        {"kind": "connect", "attempt": 2},
        {"kind": "upload", "round": 3},
        {"kind": "retry_wait"},
        {"kind": "fault_start"},
    ):
        c.count(e)
    return c


def test_counters_count_reconnects_rounds_retries_and_faults() -> None:
    c = _counters()
    assert (c.started, c.connected, c.reconnects, c.round, c.retries, c.faults) == (
        1,
        2,
        1,
        3,
        1,
        1,
    )
    assert "faults 1" in c.line(4, 5, 1.0)
    assert c.fields(4, 5)["round"] == "3/5"


def test_off_a_terminal_it_prints_a_plain_line_at_most_every_interval() -> None:
    lines: list[str] = []
    c = _counters()
    with StatusBoard(lines.append, "t", live=False, every_s=3600) as board:
        for _ in range(5):
            board.show(c.line(4, 5, 1.0), c.fields(4, 5))
        board.say("a status line")
        board.show("last", c.fields(4, 5), force=True)
    assert lines == [c.line(4, 5, 1.0), "a status line", "last"]


def test_on_a_terminal_it_shows_a_live_table_and_status_lines_above_it() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=200)
    lines: list[str] = []
    c = _counters()
    with StatusBoard(lines.append, "bk-sim smoke", live=True, console=console) as board:
        board.show("plain", c.fields(4, 5))
        board.say("broker: local")
    text = out.getvalue()
    assert lines == []  # nothing bypasses the live display
    assert "broker: local" in text
    for column in ("round", "leaves", "uploads", "notifications", "retries", "reconnects"):
        assert column in text
    assert "faults" in text and "3/5" in text
