"""A run's verdict and results.json: one shape and one writer for every workload.

Typed inside (``Check``, ``RunResult``); JSON only here, at the file edge: strict (an
infinite error becomes null, since ``Infinity`` breaks jq and JSON.parse), redacted (the
scenario's broker URLs may carry passwords) and atomic (never half-written).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bk_sim.engine._checks import Check
from bk_sim.engine._eventlog import redact
from bk_sim.files import atomic_write


@dataclass(frozen=True)
class RunTimes:
    """When a run started and ended (epoch seconds) and whether Ctrl-C cut it short."""

    started: float
    ended: float
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "started_at": iso(self.started),
            "ended_at": iso(self.ended),
            "duration_s": self.ended - self.started,
            "interrupted": self.interrupted,
        }


@dataclass(frozen=True)
class RunResult:
    """What a workload reports: the verdict, its checks, and the results.json it wrote."""

    run_dir: Path | None
    checks: tuple[Check, ...]
    interrupted: bool = False
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 passed, 1 a check failed, 2 the run was interrupted before it could finish."""
        if self.interrupted:
            return 2
        return 0 if self.passed else 1


def verdict(checks: Sequence[Check]) -> str:
    """One line: all passed, or the first failure and how many more."""
    failed = [c for c in checks if not c.passed]
    if not failed:
        return f"passed: all {len(checks)} checks"
    first = failed[0]
    more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    return f"failed: {first.name}: {first.message}{more}"


def results_document(
    result: RunResult,
    scenario: Mapping[str, Any],
    run: Mapping[str, Any],
    sections: Mapping[str, Any],
) -> dict[str, Any]:
    """The results.json document: the verdict first, then the workload's sections; what
    is written is what the workload gets back (redacted, infinities as null)."""
    doc = {
        "passed": result.passed,
        "exit_code": result.exit_code,
        "verdict": verdict(result.checks),
        "scenario": dict(scenario),
        "run": dict(run),
        "checks": [c.to_dict() for c in result.checks],
        **sections,
    }
    clean: dict[str, Any] = _finite(redact(doc))
    return clean


def write_json(path: Path, data: Any) -> None:
    """Strict JSON through a temporary name, so it is never half-written."""
    atomic_write(path, json.dumps(_finite(data), indent=2, default=str, allow_nan=False))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat()
