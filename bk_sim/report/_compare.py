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
_ABS_S = 0.005


@dataclass(frozen=True)
class Delta:
    """One figure in both runs and whether this run is worse than the baseline."""

    name: str
    baseline: float | None
    current: float | None
    regression: bool
    improvement: bool

    @property
    def change(self) -> str:
        if self.baseline is None or self.current is None:
            return "-"
        diff = self.current - self.baseline
        if self.baseline:
            return f"{diff:+.3g} ({diff / abs(self.baseline):+.0%})"
        return f"{diff:+.3g}"


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
            "verdict failed (1 = failed)",
            float(not passed_a),
            float(not passed_b),
            passed_a and not passed_b,
            passed_b and not passed_a,
        ),
    )
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def compare_lines(baseline: RunData, current: RunData, deltas: Sequence[Delta]) -> list[str]:
    """The short terminal diff: regressions first, then improvements, one line each."""
    regs = [d for d in deltas if d.regression]
    imps = [d for d in deltas if d.improvement]
    lines = [
        f"compared with {baseline.name}: {len(regs)} regression(s), {len(imps)} improvement(s)"
    ]
    lines += [
        f"  worse  {d.name}: {_fmt(d.baseline)} -> {_fmt(d.current)} {d.change}" for d in regs
    ]
    lines += [
        f"  better {d.name}: {_fmt(d.baseline)} -> {_fmt(d.current)} {d.change}" for d in imps
    ]
    return lines
