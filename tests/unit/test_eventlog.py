"""The event log scrubs known secrets and redacts secret fields before writing."""

from __future__ import annotations

import json
from pathlib import Path

from bk_sim.engine import REDACTED, EventLog, read_events


def test_known_secrets_are_scrubbed_literally_once_added(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.write({"kind": "before", "error": "tok.1"})
    log.add_secrets(("tok.1", "", "t2"))
    log.write({"kind": "after", "error": "refused tok.1 and t2, not tokx1", "leaf": 3})
    log.write({"kind": "field", "session_token": "anything", "url": "amqp://u:pw@h:5672/"})
    log.close()
    before, after, field = read_events(tmp_path / "events.jsonl")
    assert before["error"] == "tok.1"  # not yet known: only what is added is scrubbed
    assert after == {
        "kind": "after",
        "error": f"refused {REDACTED} and {REDACTED}, not tokx1",
        "leaf": 3,
    }
    assert field["session_token"] == REDACTED
    assert field["url"] == f"amqp://u:{REDACTED}@h:5672/"
    assert all(json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines())


def test_a_harness_event_is_typed_inside_and_a_plain_dict_in_the_stream() -> None:
    from bk_sim.engine import harness_event, make_harness_event

    ev = make_harness_event("upload", leaf=3, leaf_id="L3", round=2, file_id="f", base=None)
    assert (ev.kind, ev.leaf, ev.leaf_id, ev.round) == ("upload", 3, "L3", 2)
    d = ev.to_dict()
    assert d == {
        "kind": "upload",
        "t": ev.t,
        "leaf": 3,
        "leaf_id": "L3",
        "round": 2,
        "file_id": "f",
    }
    plain = harness_event("run_deadline", run_s=5.0, leaf=None)
    assert set(plain) == {"kind", "t", "run_s"}  # None fields are left out
