"""Forensics: which leaf did a wrong aggregate get wrong, and how.

A FedAvg or mean aggregate is a linear combination of the round's uploads, sum(a_i x_i),
with a_i the leaf's normalized weight. Given the uploads and the aggregate, least squares
over a random sample of coordinates recovers every a_i (the synthetic updates are linearly
independent by construction, see ``bk_sim.synth``). Comparing a_i with the weights the
strategy expects names the fault:

- stale: the aggregate equals a previous aggregation's (checked first, exactly);
- dropped: a_i ~ 0; double-counted: a_i ~ 2x its expected weight relative to the others;
- weights ignored: every a_i ~ 1/N although the weightings differ;
- mis-weighted: any other a_i off by more than 1% (and 4 standard errors of the fit).

"Relative to the others" because a platform that drops or duplicates a leaf usually
renormalizes, which scales every other weight a little: ratios a_i / expected_i are divided
by their median (N >= 3) before judging. Median and trimmed mean are not linear; for them
forensics only says whether the aggregate is (wrongly) a weighted mean of the uploads.
Integer layers are skipped (rounding makes them useless for the fit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bk_sim.validate._compare import compare

#: A leaf whose relative weight is below this was dropped.
DROPPED_BELOW = 0.1
#: A leaf whose relative weight is within this of 2 was counted twice.
DOUBLE_WITHIN = 0.1
#: Relative deviation from 1 beyond which a leaf is mis-weighted.
MISWEIGHT_ABOVE = 0.01
#: The fit must explain the aggregate to this relative residual to be trusted.
LINEAR_RESIDUAL = 1e-3


@dataclass(frozen=True)
class Forensics:
    """What the aggregate did to each leaf, and one or two sentences saying so."""

    effective_weights: dict[str, float]
    expected_weights: dict[str, float]
    dropped: list[str]
    double_counted: list[str]
    misweighted: list[str]
    unweighted: bool
    stale_of: str | None
    summary: str
    residual: float | None = None
    coordinates: int = 0
    std_errors: dict[str, float] = field(default_factory=dict)

    @property
    def found_fault(self) -> bool:
        return bool(
            self.dropped
            or self.double_counted
            or self.misweighted
            or self.unweighted
            or self.stale_of
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "effective_weights": dict(self.effective_weights),
            "expected_weights": dict(self.expected_weights),
            "dropped": list(self.dropped),
            "double_counted": list(self.double_counted),
            "misweighted": list(self.misweighted),
            "unweighted": self.unweighted,
            "stale_of": self.stale_of,
            "summary": self.summary,
            "residual": self.residual,
            "coordinates": self.coordinates,
            "std_errors": dict(self.std_errors),
        }


def forensics(
    actual: Sequence[np.ndarray],
    contributions: Mapping[str, tuple[float, Sequence[np.ndarray]]],
    strategy: str,
    *,
    previous_aggregates: Mapping[str, Sequence[np.ndarray]] | None = None,
    sample: int = 4096,
    seed: int = 0,
    trim_fraction: float = 0.1,
) -> Forensics:
    """Recover each leaf's effective weight in ``actual`` and say what went wrong.

    ``contributions`` maps leaf id -> (weighting, layers); each value is read once, so a
    lazy mapping that regenerates uploads on access keeps memory at one upload plus the
    sample. ``previous_aggregates`` maps aggregation id -> layers of earlier rounds.
    """
    ids = list(contributions)
    n = len(ids)
    for agg_id, previous in (previous_aggregates or {}).items():
        if _same(actual, previous):
            return _stale(agg_id)
    if n == 0:
        return _empty("no contributions to compare the aggregate with")
    coords = _float_coordinates(actual)
    # NaN makes the fit's residual NaN, which reads as a perfect fit: say what it is instead.
    non_finite = sum(int(np.count_nonzero(~np.isfinite(np.asarray(actual[i])))) for i, _ in coords)
    if non_finite:
        return _empty(f"the aggregate holds {non_finite:,} NaN or infinite values")
    total = sum(size for _, size in coords)
    if total < n:
        return _empty(
            f"forensics needs at least {n} float coordinates (one per leaf) to separate the "
            f"leaves; the model has {total}"
        )
    m = min(total, max(sample, 4 * n))
    picks = _pick(coords, m, seed)
    x = np.empty((m, n), dtype=np.float64)
    weights = np.empty(n, dtype=np.float64)
    shapes = [np.shape(a) for a in actual]
    for j, leaf in enumerate(ids):
        weighting, layers = contributions[leaf]
        if [np.shape(a) for a in layers] != shapes:
            return _empty(
                f"leaf {leaf}'s upload has layer shapes {[np.shape(a) for a in layers]}, the "
                f"aggregate {shapes}"
            )
        weights[j] = float(weighting)
        x[:, j] = _gather(layers, picks)
    y = _gather(actual, picks)
    alpha, se, residual = _fit(x, y)
    effective = {leaf: float(a) for leaf, a in zip(ids, alpha, strict=True)}
    std_errors = {leaf: float(s) for leaf, s in zip(ids, se, strict=True)}
    linear_strategy = _effective_strategy(strategy, n, trim_fraction)
    base: dict[str, Any] = dict(
        effective_weights=effective, residual=residual, coordinates=len(y), std_errors=std_errors
    )
    if linear_strategy is None:
        return _nonlinear(strategy, residual, effective, base)
    if linear_strategy == "fedavg":
        expected_arr = weights / weights.sum()
    else:
        expected_arr = np.full(n, 1.0 / n)
    expected = {leaf: float(e) for leaf, e in zip(ids, expected_arr, strict=True)}
    if not math.isfinite(residual) or residual > LINEAR_RESIDUAL:
        return Forensics(
            expected_weights=expected, dropped=[], double_counted=[], misweighted=[],
            unweighted=False, stale_of=None,
            summary=(
                f"The aggregate is not a weighted mean of this round's uploads (the best fit "
                f"leaves {residual:.1%} unexplained): values were corrupted, or it was built "
                f"from other uploads."
            ),
            **base,
        )  # fmt: skip
    return _classify(ids, alpha, se, expected_arr, expected, strategy, base)


# --------------------------------------------------------------------------- helpers


def _same(actual: Sequence[np.ndarray], previous: Sequence[np.ndarray]) -> bool:
    if len(actual) != len(previous):
        return False
    for a, p in zip(actual, previous, strict=True):
        if np.shape(a) != np.shape(p):
            return False
    ref = [np.asarray(p, dtype=np.float64) for p in previous]
    dtypes = [np.asarray(a).dtype for a in actual]
    return compare(ref, actual, rtol=None, atol=None, expected_dtypes=dtypes).passed


def _stale(agg_id: str) -> Forensics:
    return Forensics(
        effective_weights={}, expected_weights={}, dropped=[], double_counted=[],
        misweighted=[], unweighted=False, stale_of=agg_id,
        summary=(
            f"The aggregate equals aggregation {agg_id} from an earlier round: the platform "
            f"returned a stale aggregate instead of this round's."
        ),
    )  # fmt: skip


def _empty(summary: str) -> Forensics:
    return Forensics(
        effective_weights={}, expected_weights={}, dropped=[], double_counted=[],
        misweighted=[], unweighted=False, stale_of=None,
        summary=f"Forensics not possible: {summary}.",
    )  # fmt: skip


def _float_coordinates(actual: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """(layer index, size) of every float layer of the aggregate."""
    return [
        (i, int(np.asarray(a).size))
        for i, a in enumerate(actual)
        if np.asarray(a).dtype.kind == "f" and np.asarray(a).size
    ]


def _pick(coords: list[tuple[int, int]], m: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """``m`` distinct coordinates drawn over all float layers, grouped by layer."""
    sizes = np.array([s for _, s in coords], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rng = np.random.default_rng(seed)
    flat = np.sort(rng.choice(int(starts[-1]), size=m, replace=False))
    which = np.searchsorted(starts, flat, side="right") - 1
    out = []
    for k, (layer, _) in enumerate(coords):
        offsets = flat[which == k] - starts[k]
        if offsets.size:
            out.append((layer, offsets))
    return out


def _gather(layers: Sequence[np.ndarray], picks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    return np.concatenate(
        [np.asarray(layers[i]).reshape(-1)[offs].astype(np.float64) for i, offs in picks]
    )


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares weights, their standard errors, and the relative residual."""
    alpha, _, rank, _ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ alpha
    norm_y = float(np.linalg.norm(y))
    residual = float(np.linalg.norm(resid)) / norm_y if norm_y > 0 else 0.0
    m, n = x.shape
    se = np.full(n, math.inf)
    if rank == n and m > n:
        sigma2 = float(resid @ resid) / (m - n)
        try:
            _, r = np.linalg.qr(x)
            r_inv = np.linalg.inv(r)
            se = np.sqrt(sigma2 * np.sum(r_inv * r_inv, axis=1))
        except np.linalg.LinAlgError:
            pass
    return alpha, se, residual


def _effective_strategy(strategy: str, n: int, trim_fraction: float) -> str | None:
    """The linear strategy the aggregate should equal, or None when it is not linear.

    A median of one or two values, and a trimmed mean that trims nothing, are the mean.
    """
    if strategy in ("fedavg", "mean"):
        return strategy
    if strategy == "median" and n <= 2:
        return "mean"
    if strategy == "trimmed_mean" and math.floor(trim_fraction * n) == 0:
        return "mean"
    return None


def _nonlinear(
    strategy: str, residual: float, effective: dict[str, float], base: dict[str, Any]
) -> Forensics:
    linear = math.isfinite(residual) and residual <= LINEAR_RESIDUAL
    if linear:
        summary = (
            f"The aggregate is a weighted mean of the uploads (fit residual {residual:.1e}), "
            f"but {strategy} is not linear: the platform probably averaged instead of "
            f"computing the {strategy}."
        )
    else:
        summary = (
            f"The aggregate is not a weighted mean of the uploads, as expected for "
            f"{strategy}; per-leaf weight forensics apply to fedavg and mean only."
        )
    return Forensics(
        expected_weights={}, dropped=[], double_counted=[], misweighted=[],
        unweighted=False, stale_of=None, summary=summary, **base,
    )  # fmt: skip


def _classify(
    ids: list[str],
    alpha: np.ndarray,
    se: np.ndarray,
    expected_arr: np.ndarray,
    expected: dict[str, float],
    strategy: str,
    base: dict[str, Any],
) -> Forensics:
    n = len(ids)
    ratio = alpha / expected_arr
    if n >= 3:
        norm = float(np.median(ratio))
    else:  # two leaves: the smaller clearly-positive ratio is the "counted once" one
        positive = ratio[ratio > 0.25 * ratio.max()]
        norm = float(positive.min()) if positive.size else 1.0
    if not norm > 0:
        norm = 1.0
    rel = ratio / norm
    rel_se = se / (expected_arr * norm)
    # Weights ignored: every leaf ~1/N while the weightings differ.
    spread = float(expected_arr.max() / expected_arr.min())
    flat = np.abs(alpha * n - 1.0) <= np.maximum(MISWEIGHT_ABOVE, 4 * se * n)
    if strategy == "fedavg" and spread > 1.0 + 10 * MISWEIGHT_ABOVE and flat.all():
        return Forensics(
            expected_weights=expected, dropped=[], double_counted=[], misweighted=[],
            unweighted=True, stale_of=None,
            summary=(
                f"The weightings were ignored: every leaf got about 1/{n} = {1 / n:.4g} "
                f"although fedavg weights range from {expected_arr.min():.4g} to "
                f"{expected_arr.max():.4g}."
            ),
            **base,
        )  # fmt: skip
    dropped, doubled, misweighted = [], [], []
    for leaf, q, q_se in zip(ids, rel, rel_se, strict=True):
        if abs(q) < DROPPED_BELOW:
            dropped.append(leaf)
        elif abs(q - 2.0) < DOUBLE_WITHIN:
            doubled.append(leaf)
        elif abs(q - 1.0) > max(MISWEIGHT_ABOVE, 4 * q_se):
            misweighted.append(leaf)
    eff = base["effective_weights"]
    sentences = []
    if dropped:
        sentences.append(
            f"{_names(dropped)} {'was' if len(dropped) == 1 else 'were'} dropped "
            f"({_pairs(dropped, eff, expected)})."
        )
    if doubled:
        sentences.append(
            f"{_names(doubled)} {'was' if len(doubled) == 1 else 'were'} counted twice: "
            f"about 2x its expected weight relative to the others "
            f"({_pairs(doubled, eff, expected)})."
        )
    if misweighted:
        sentences.append(
            f"{_names(misweighted)} {'was' if len(misweighted) == 1 else 'were'} "
            f"mis-weighted ({_pairs(misweighted, eff, expected)})."
        )
    total = float(alpha.sum())
    if not sentences:
        worst = float(np.max(np.abs(rel - 1.0)))
        sentences.append(
            f"All {n} leaves got their expected {strategy} weight (largest relative deviation "
            f"{worst:.2g})."
        )
        if abs(total - 1.0) > MISWEIGHT_ABOVE:
            sentences.append(f"But the effective weights sum to {total:.4g}, not 1.")
    return Forensics(
        expected_weights=expected,
        dropped=dropped,
        double_counted=doubled,
        misweighted=misweighted,
        unweighted=False,
        stale_of=None,
        summary=" ".join(sentences),
        **base,
    )


def _names(leaves: list[str], limit: int = 5) -> str:
    shown = ", ".join(leaves[:limit])
    more = f" and {len(leaves) - limit} more" if len(leaves) > limit else ""
    return f"Leaf {shown}" if len(leaves) == 1 else f"Leaves {shown}{more}"


def _pairs(
    leaves: list[str], eff: Mapping[str, float], expected: Mapping[str, float], limit: int = 3
) -> str:
    if len(leaves) == 1:  # the sentence already names it
        return f"effective weight {eff[leaves[0]]:.4g}, expected {expected[leaves[0]]:.4g}"
    parts = [f"{leaf}: effective {eff[leaf]:.4g}, expected {expected[leaf]:.4g}" for leaf in leaves]
    more = f", and {len(leaves) - limit} more" if len(leaves) > limit else ""
    return "; ".join(parts[:limit]) + more
