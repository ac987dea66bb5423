"""The run's event log: one JSONL file, the single source for results and reports.

Leaf processes do not write the file themselves: they send events to the orchestrator
over a queue, and one writer appends them, so lines never interleave and the progress
display reads the same stream. Secrets are redacted before anything is written.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bk_sim.client import ClientEvent
from bk_sim.engine._scrub import SecretScrubber

_SECRET_KEYS = frozenset({"session_token", "authorization", "admin_token", "password", "token"})
_BEARER_RE = re.compile(r"(Bearer\s+[^\s:]+:)[^\s\"']+")
_URL_PASSWORD_RE = re.compile(r"(://[^:/@\s]+:)[^@/\s]+@")
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy of ``value`` with secret fields and secrets inside strings replaced."""
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if str(k).lower() in _SECRET_KEYS else redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD_RE.sub(rf"\1{REDACTED}@", _BEARER_RE.sub(rf"\1{REDACTED}", value))
    return value


@dataclass(frozen=True)
class HarnessEvent:
    """An event of the harness itself (a leaf's behaviour, the engine, chaos): typed while
    it moves inside a process; ``to_dict`` is its form in the event stream and the log."""

    kind: str
    t: float = field(default_factory=time.time)
    leaf: int | None = None
    leaf_id: str | None = None
    round: int | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "t": self.t}
        for key, value in (("leaf", self.leaf), ("leaf_id", self.leaf_id), ("round", self.round)):
            if value is not None:
                d[key] = value
        d.update((k, v) for k, v in self.fields.items() if v is not None)
        return d


def make_harness_event(kind: str, **fields: Any) -> HarnessEvent:
    """A ``HarnessEvent``; ``leaf``, ``leaf_id`` and ``round`` become its typed fields."""
    leaf, leaf_id, rnd = fields.pop("leaf", None), fields.pop("leaf_id", None), None
    if isinstance(fields.get("round"), int):
        rnd = fields.pop("round")
    return HarnessEvent(kind, leaf=leaf, leaf_id=leaf_id, round=rnd, fields=fields)


def harness_event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event of the harness itself, in its stream form (a plain dict); None fields are
    left out."""
    return make_harness_event(kind, **fields).to_dict()


def client_event(event: ClientEvent, **extra: Any) -> dict[str, Any]:
    """A client core event as a plain dict, tagged with the harness's fields (leaf index)."""
    return {**event.to_dict(), **extra}


class EventLog:
    """Appends events to ``events.jsonl``; also known secrets are scrubbed from strings."""

    def __init__(self, path: Path, secrets: tuple[str, ...] = ()) -> None:
        self.path = path
        self._scrub = SecretScrubber(REDACTED)
        self.add_secrets(secrets)
        self._fh: TextIO = path.open("a", encoding="utf-8")

    def add_secrets(self, secrets: tuple[str, ...]) -> None:
        # One pass per line whatever the number of tokens (a 10,000-leaf run has 10,000).
        self._scrub.add(secrets)

    def write(self, event: Mapping[str, Any]) -> None:
        line = json.dumps(redact(event), separators=(",", ":"), default=str)
        if self._scrub:
            line = self._scrub.sub(line)
        self._fh.write(line + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of a log, in order; a torn last line (a killed run) is skipped."""
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
