"""Fault injection for one branch: HTTP faults, notification faults, aggregation bugs.

The harness sets these through ``PUT /admin/v1/branches/<id>/faults`` to check that a
client survives a flaky platform and that the validator catches a wrong aggregate. Rates
draw from a seeded RNG so a test that sends the same requests sees the same faults.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from bk_sim.platform._aggregate import AGGREGATION_BUGS
from bk_sim.platform._analytics import ANALYTICS_FAULTS

ENDPOINTS = (
    "upload",
    "download",
    "download_url",
    "run",
    "metrics",
    "branch_config",
    "ws_ticket",
    "*",
)
AGGREGATION_FAULTS = (*AGGREGATION_BUGS, "stale")
DEFAULT_SEED = 0


class FaultSpecError(ValueError):
    """A fault specification that cannot be applied; the message names the field."""


@dataclass
class HttpFault:
    """One HTTP fault rule; ``count`` is how many more times it may fire (None: always)."""

    endpoint: str = "*"
    status: int | None = 503
    rate: float = 1.0
    count: int | None = None
    retry_after: float | None = None
    latency_s: float = 0.0
    reset: bool = False
    drop_response: bool = False

    def matches(self, endpoint: str) -> bool:
        return (self.endpoint in ("*", endpoint)) and (self.count is None or self.count > 0)


@dataclass
class NotificationFaults:
    delay_s: float = 0.0
    drop_rate: float = 0.0


@dataclass
class BranchFaults:
    """Every fault set on one branch, with the RNG that decides rate-based ones."""

    http: list[HttpFault] = field(default_factory=list)
    notifications: NotificationFaults = field(default_factory=NotificationFaults)
    aggregation: str | None = None
    #: FA rounds only (docs/analytics.md): mean_of_means, drop_leaf, nan_poisoned, double_count
    analytics: str | None = None
    dedupe: bool = True
    seed: int = DEFAULT_SEED
    _rng: random.Random = field(default_factory=lambda: random.Random(DEFAULT_SEED), repr=False)

    @classmethod
    def from_json(cls, payload: Any) -> BranchFaults:
        """Parse the admin API's fault body; raises ``FaultSpecError`` naming the bad field."""
        if not isinstance(payload, dict):
            raise FaultSpecError("faults must be a JSON object")
        unknown = set(payload) - {
            "http",
            "notifications",
            "aggregation",
            "analytics",
            "dedupe",
            "seed",
        }
        if unknown:
            raise FaultSpecError(f"unknown fault keys: {', '.join(sorted(unknown))}")
        rules = payload.get("http")
        rules = [] if rules is None else rules
        if not isinstance(rules, list):
            raise FaultSpecError("http must be a list of fault rules")
        http = [_http_rule(i, r) for i, r in enumerate(rules)]
        notes = payload.get("notifications")
        notes = {} if notes is None else notes
        if not isinstance(notes, dict):
            raise FaultSpecError("notifications must be an object")
        unknown = set(notes) - {"delay_s", "drop_rate"}
        if unknown:
            raise FaultSpecError(f"unknown notifications keys: {', '.join(sorted(unknown))}")
        notifications = NotificationFaults(
            delay_s=_number("notifications.delay_s", notes.get("delay_s", 0.0), low=0.0),
            drop_rate=_number("notifications.drop_rate", notes.get("drop_rate", 0.0), 0.0, 1.0),
        )
        aggregation = payload.get("aggregation")
        if aggregation is not None and aggregation not in AGGREGATION_FAULTS:
            raise FaultSpecError(
                f"aggregation must be null or one of {', '.join(AGGREGATION_FAULTS)}, "
                f"got {aggregation!r}"
            )
        analytics = payload.get("analytics")  # FA faults
        if analytics is not None and analytics not in ANALYTICS_FAULTS:
            raise FaultSpecError(
                f"analytics must be null or one of {', '.join(ANALYTICS_FAULTS)}, got {analytics!r}"
            )
        dedupe = payload.get("dedupe", True)
        if not isinstance(dedupe, bool):
            raise FaultSpecError("dedupe must be true or false")
        seed = payload.get("seed", DEFAULT_SEED)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise FaultSpecError("seed must be an integer")
        return cls(
            http=http,
            notifications=notifications,
            aggregation=aggregation,
            analytics=analytics,
            dedupe=dedupe,
            seed=seed,
            _rng=random.Random(seed),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "http": [asdict(r) for r in self.http],
            "notifications": asdict(self.notifications),
            "aggregation": self.aggregation,
            "analytics": self.analytics,
            "dedupe": self.dedupe,
            "seed": self.seed,
        }

    def pick_http(self, endpoint: str) -> HttpFault | None:
        """The rule that fires for this request, if any (consumes its count)."""
        for rule in self.http:
            if not rule.matches(endpoint):
                continue
            if rule.rate < 1.0 and self._rng.random() >= rule.rate:
                continue
            if rule.count is not None:
                rule.count -= 1
            return rule
        return None

    def drop_notification(self) -> bool:
        rate = self.notifications.drop_rate
        return rate > 0 and self._rng.random() < rate


def is_finite(value: float) -> bool:
    """``math.isfinite`` that says False, not OverflowError, for an int beyond float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(name: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not is_finite(value):
        raise FaultSpecError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise FaultSpecError(f"{name} must be within [{low}, {high}], got {value!r}")
    return float(value)


def _http_rule(index: int, raw: Any) -> HttpFault:
    where = f"http[{index}]"
    if not isinstance(raw, dict):
        raise FaultSpecError(f"{where} must be an object")
    known = set(HttpFault.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise FaultSpecError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    endpoint = raw.get("endpoint", "*")
    if endpoint not in ENDPOINTS:
        raise FaultSpecError(f"{where}.endpoint must be one of {', '.join(ENDPOINTS)}")
    status = raw.get("status", 503)
    if status is not None and (
        not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599
    ):
        raise FaultSpecError(f"{where}.status must be null or an HTTP error status 400-599")
    count = raw.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise FaultSpecError(f"{where}.count must be null or an integer >= 0")
    retry_after = raw.get("retry_after")
    if retry_after is not None:
        retry_after = _number(f"{where}.retry_after", retry_after, low=0.0)
    for flag in ("reset", "drop_response"):
        if not isinstance(raw.get(flag, False), bool):
            raise FaultSpecError(f"{where}.{flag} must be true or false")
    return HttpFault(
        endpoint=endpoint,
        status=status,
        rate=_number(f"{where}.rate", raw.get("rate", 1.0), 0.0, 1.0),
        count=count,
        retry_after=retry_after,
        latency_s=_number(f"{where}.latency_s", raw.get("latency_s", 0.0), low=0.0),
        reset=raw.get("reset", False),
        drop_response=raw.get("drop_response", False),
    )
