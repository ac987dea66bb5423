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
