"""Known secrets are scrubbed from event-log lines, however many there are."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

from bk_sim.engine import EventLog
from bk_sim.engine._scrub import SecretScrubber


def test_every_occurrence_of_every_secret_is_masked() -> None:
    s = SecretScrubber("***")
    tokens = tuple(secrets.token_urlsafe(32) for _ in range(2000))
    s.add(tokens + ("short", ""))
    line = f'{{"a":"{tokens[5]}","b":"x{tokens[1999]}y {tokens[5]}","c":"a short note"}}'
    assert s.sub(line) == '{"a":"***","b":"x***y ***","c":"a *** note"}'
    assert s.sub("nothing here") == "nothing here"


def test_the_longest_secret_sharing_a_prefix_wins() -> None:
    s = SecretScrubber("#")
    s.add(("abcdefgh1", "abcdefgh123"))
    assert s.sub("xabcdefgh123y abcdefgh1z") == "x#y #z"


def test_event_log_scrubs_tokens_added_later(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", ("admintoken-123456",))
    tokens = tuple(secrets.token_urlsafe(32) for _ in range(1000))
    log.add_secrets(tokens)
    leaf = str(uuid.uuid4())
    log.write(
        {"t": 1.0, "kind": "x", "leaf_id": leaf, "error": f"bad {tokens[7]} / admintoken-123456"}
    )
    log.close()
    (e,) = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert e["error"] == "bad *** / ***" and e["leaf_id"] == leaf
