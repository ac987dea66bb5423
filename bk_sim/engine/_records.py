"""Typed round records and round verdicts: what the platform says a round was, and what
the judge found. JSON (the admin API, results.json) only at the edges: ``from_dict`` and
``to_dict``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _mapping(value: Any) -> Mapping[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


@dataclass(frozen=True)
class RecordedUpload:
    """One upload a round counted, as the platform recorded it."""

    leaf_id: str
    file_id: str
    weighting: float | None = None
    #: ``sha256=<base64>`` of the stored file, when the platform says (names load payloads)
    digest: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordedUpload:
        w = d.get("weighting")
        return cls(
            str(d.get("leaf_id")),
            str(d.get("file_id")),
            None if w is None else float(w),
            _opt_str(d.get("digest")),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "leaf_id": self.leaf_id,
            "file_id": self.file_id,
            "weighting": self.weighting,
        }
        if self.digest is not None:
            d["digest"] = self.digest
        return d


@dataclass(frozen=True)
class RoundRecord:
    """A round as the platform (or, for a platform without records, the run's own
    events) tells it: status, its aggregate and the uploads it counted."""

    round: int
    status: str
    aggregation_id: str | None = None
    uploads: tuple[RecordedUpload, ...] = ()
    close_reason: str | None = None
    error: str | None = None
    #: Unix seconds or ISO 8601, as the platform wrote it (``as_time`` reads both)
    closed_at: float | str | None = None
    #: ``federated_learning`` or ``federated_analytics`` when the platform says
    kind: str | None = None
    #: FA rounds: the record's ``analytics`` (``fields``, ``derived`` statistics)
    analytics: Mapping[str, Any] | None = None
    #: a deliberate fault the platform says it applied to the round (its self-test)
    fault: Mapping[str, Any] | None = None

    @property
    def aggregated(self) -> bool:
        return self.status == "aggregated" and bool(self.aggregation_id)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        closed = d.get("closed_at")
        return cls(
            round=int(d.get("round", 0) or 0),
            status=str(d.get("status", "")),
            aggregation_id=_opt_str(d.get("aggregation_id")) or None,
            uploads=tuple(RecordedUpload.from_dict(u) for u in d.get("uploads") or ()),
            close_reason=_opt_str(d.get("close_reason")),
            error=_opt_str(d.get("error")),
            closed_at=closed if isinstance(closed, (int, float, str)) else None,
            kind=_opt_str(d.get("kind")),
            analytics=_mapping(d.get("analytics")),
            fault=_mapping(d.get("fault")),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "round": self.round,
            "status": self.status,
            "aggregation_id": self.aggregation_id,
            "uploads": [u.to_dict() for u in self.uploads],
            "close_reason": self.close_reason,
            "error": self.error,
            "closed_at": self.closed_at,
        }
        for key, value in (("kind", self.kind), ("analytics", self.analytics)):
            if value is not None:
                d[key] = value if isinstance(value, str) else dict(value)
        if self.fault is not None:
            d["fault"] = dict(self.fault)
        return d


#: Keys results.json has only when the judge found a value for them.
_ONLY_WHEN_SET = ("reason", "layers", "wall_time_s", "harness_share", "validator_mb_s")


@dataclass(frozen=True)
class RoundVerdict:
    """The judge's finding on one round: is its aggregate the reference, and if not why
    (``reason``) and whose fault (``forensics``)."""

    round: int
    aggregation_id: str | None
    strategy: str
    close_reason: str | None
    uploads: int
    passed: bool = False
    reason: str | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    layers: tuple[Mapping[str, Any], ...] | None = None
    forensics: Mapping[str, Any] | None = None
    validation_s: float = 0.0
    wall_time_s: float | None = None
    harness_share: float | None = None
    validator_mb_s: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "round": self.round,
            "aggregation_id": self.aggregation_id,
            "strategy": self.strategy,
            "close_reason": self.close_reason,
            "uploads": self.uploads,
            "max_abs_error": self.max_abs_error,
            "max_rel_error": self.max_rel_error,
            "forensics": None if self.forensics is None else dict(self.forensics),
            "passed": self.passed,
            "reason": self.reason,
            "layers": None if self.layers is None else [dict(x) for x in self.layers],
            "validation_s": self.validation_s,
            "wall_time_s": self.wall_time_s,
            "harness_share": self.harness_share,
            "validator_mb_s": self.validator_mb_s,
        }
        for key in _ONLY_WHEN_SET:
            if d[key] is None:
                del d[key]
        return d
