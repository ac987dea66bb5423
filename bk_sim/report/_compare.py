"""Two runs side by side: which figures got worse (latency, errors, correctness, wall time).

Every compared figure is "larger is worse". A change counts as a regression only when it
is both relatively large and absolutely meaningful, so timer noise on a 20 ms upload does
not cry wolf: latency and wall time need +20 % and +5 ms, counts need any increase,
the relative error needs 10x and to pass 1e-6.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bk_sim.report._load import RunData
from bk_sim.report._metrics import run_metrics

_REL = 0.20
VERDICT = "verdict"
_ABS_S = 0.005


@dataclass(frozen=True)
class Delta:
    """One figure in both runs and whether this run is worse than the baseline."""

    name: str
    baseline: float | None
    current: float | None
    regression: bool
    improvement: bool

    def show(self, value: float | None) -> str:
        """A value as people read it (the verdict as PASSED/FAILED)."""
        if value is None:
            return "-"
        if self.name == VERDICT:
            return "FAILED" if value else "PASSED"
        return f"{value:.4g}"

    @property
    def change(self) -> str:
        if self.baseline is None or self.current is None or self.name == VERDICT:
            return ""
        diff = self.current - self.baseline
        if not self.baseline:
            return f"{diff:+.3g}"
        ratio = self.current / self.baseline
        if abs(ratio) >= 10:
            return f"{diff:+.3g} (x{ratio:.3g})"
        return f"{diff:+.3g} ({diff / abs(self.baseline):+.0%})"


def _worse(name: str, base: float, cur: float) -> bool:
    if name.endswith("(s)"):
        return cur > base * (1 + _REL) and cur - base > _ABS_S
    if name == "max relative error":
        return cur > max(base * 10, 1e-6)
    return cur > base


def compare_runs(baseline: RunData, current: RunData) -> list[Delta]:
    """Figures of ``current`` against ``baseline``, in a fixed order."""
    a = run_metrics(baseline.results, baseline.events)
    b = run_metrics(current.results, current.events)
    out = []
    for name, base in a.items():
        cur = b.get(name)
        if base is None or cur is None:
            out.append(Delta(name, base, cur, False, False))
            continue
        out.append(Delta(name, base, cur, _worse(name, base, cur), _worse(name, cur, base)))
    passed_a, passed_b = bool(baseline.results.get("passed")), bool(current.results.get("passed"))
    out.insert(
        0,
        Delta(
            VERDICT,
            float(not passed_a),
            float(not passed_b),
            passed_a and not passed_b,
            passed_b and not passed_a,
        ),
    )
    return out


def compare_lines(baseline: RunData, current: RunData, deltas: Sequence[Delta]) -> list[str]:
    """The short terminal diff: regressions first, then improvements, one line each."""
    regs = [d for d in deltas if d.regression]
    imps = [d for d in deltas if d.improvement]
    lines = [
        f"compared with {baseline.name}: {len(regs)} regression(s), {len(imps)} improvement(s)"
    ]
    other = scenario_mismatch(baseline, current)
    if other:
        lines.append(f"  note: {other}")
    for label, group in (("worse ", regs), ("better", imps)):
        lines += [
            f"  {label} {d.name}: {d.show(d.baseline)} -> {d.show(d.current)} {d.change}".rstrip()
            for d in group
        ]
    return lines


def scenario_mismatch(baseline: RunData, current: RunData) -> str:
    """A warning when the two runs played different scenarios ("" when they match)."""
    a = (baseline.results.get("scenario") or {}).get("name")
    b = (current.results.get("scenario") or {}).get("name")
    if a and b and a != b:
        return f"different scenarios ({a} vs {b}): figures may not be comparable"
    return ""
