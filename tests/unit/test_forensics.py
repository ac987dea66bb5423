"""Forensics names exactly the leaf (or round) a wrong aggregate got wrong, and nothing else."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pytest

from bk_sim.scenario import LayerSpec, ModelSpec, WeightingSpec
from bk_sim.synth import leaf_update, leaf_weightings
from bk_sim.validate import Forensics, forensics, reference_aggregate

MODEL = ModelSpec(
    layers=(
        LayerSpec(shape=(40, 30), dtype="float32"),
        LayerSpec(shape=(30,), dtype="float32"),
        LayerSpec(shape=(3, 3, 4, 4), dtype="float16"),
        LayerSpec(shape=(), dtype="int64"),
    )
)
N = 9
Contribs = dict[str, tuple[float, list[np.ndarray]]]


def _contributions(round_index: int = 1, n: int = N) -> Contribs:
    w = leaf_weightings(5, WeightingSpec(distribution="lognormal", mu=4.0, sigma=1.0), n)
    return {
        f"leaf-{i}": (float(w[i]), leaf_update(5, i, round_index, None, MODEL)) for i in range(n)
    }


def _aggregate(
    pairs: Sequence[tuple[float, Sequence[np.ndarray]]], strategy: str
) -> list[np.ndarray]:
    """What a platform returns: float64 reference cast to the uploads' dtypes."""
    ref = reference_aggregate(pairs, strategy)
    out = []
    for x, d in zip(ref, ref.dtypes, strict=True):
        out.append(x.astype(d) if d.kind == "f" else np.rint(x).astype(d))
    return out


def _assert_names_nothing(f: Forensics) -> None:
    assert f.dropped == [] and f.double_counted == [] and f.misweighted == []
    assert f.unweighted is False and f.stale_of is None
    assert f.found_fault is False


def test_correct_fedavg_names_nothing() -> None:
    c = _contributions()
    f = forensics(_aggregate(list(c.values()), "fedavg"), c, "fedavg")
    _assert_names_nothing(f)
    assert f.summary.startswith(f"All {N} leaves got their expected fedavg weight")
    total = sum(w for w, _ in c.values())
    for leaf, (w, _) in c.items():
        assert f.expected_weights[leaf] == pytest.approx(w / total)
        assert f.effective_weights[leaf] == pytest.approx(w / total, rel=1e-3, abs=1e-5)
    assert f.coordinates == 1200 + 30 + 144  # every float coordinate (fewer than sample)


def test_dropped_leaf_is_named() -> None:
    c = _contributions()
    f = forensics(_aggregate([v for k, v in c.items() if k != "leaf-4"], "fedavg"), c, "fedavg")
    assert f.dropped == ["leaf-4"]
    assert f.double_counted == [] and f.misweighted == [] and not f.unweighted
    assert f.summary.startswith("Leaf leaf-4 was dropped (effective weight ")
    assert abs(f.effective_weights["leaf-4"]) < 1e-3


def test_two_dropped_leaves_are_both_named() -> None:
    c = _contributions()
    kept = [v for k, v in c.items() if k not in ("leaf-1", "leaf-6")]
    f = forensics(_aggregate(kept, "fedavg"), c, "fedavg")
    assert f.dropped == ["leaf-1", "leaf-6"] and f.misweighted == [] and f.double_counted == []
    assert f.summary.startswith("Leaves leaf-1, leaf-6 were dropped (leaf-1: effective")


def test_double_counted_leaf_is_named() -> None:
    c = _contributions()
    f = forensics(_aggregate([*c.values(), c["leaf-2"]], "fedavg"), c, "fedavg")
    assert f.double_counted == ["leaf-2"]
    assert f.dropped == [] and f.misweighted == [] and not f.unweighted
    assert "Leaf leaf-2 was counted twice" in f.summary


def test_unweighted_mean_is_named_as_weights_ignored() -> None:
    c = _contributions()
    f = forensics(_aggregate(list(c.values()), "mean"), c, "fedavg")
    assert f.unweighted is True
    assert f.dropped == [] and f.double_counted == [] and f.misweighted == []
    assert f.summary.startswith(f"The weightings were ignored: every leaf got about 1/{N}")


def test_misweighted_leaf_is_named() -> None:
    c = _contributions()
    pairs = [(w * 1.5 if k == "leaf-7" else w, layers) for k, (w, layers) in c.items()]
    f = forensics(_aggregate(pairs, "fedavg"), c, "fedavg")
    assert f.misweighted == ["leaf-7"]
    assert f.dropped == [] and f.double_counted == []
    assert "leaf-7 was mis-weighted" in f.summary


def test_stale_aggregate_names_the_round_it_came_from() -> None:
    round1 = _contributions(1)
    round2 = _contributions(2)
    agg1 = _aggregate(list(round1.values()), "fedavg")
    agg_other = _aggregate(list(_contributions(3).values()), "fedavg")
    f = forensics(agg1, round2, "fedavg", previous_aggregates={"agg-0": agg_other, "agg-1": agg1})
    assert f.stale_of == "agg-1"
    assert "aggregation agg-1 from an earlier round" in f.summary
    # the round's own correct aggregate is not mistaken for a stale one
    ok = forensics(_aggregate(list(round2.values()), "fedavg"), round2, "fedavg",
                   previous_aggregates={"agg-1": agg1})  # fmt: skip
    _assert_names_nothing(ok)


def test_mean_strategy_correct_and_dropped() -> None:
    c = _contributions()
    _assert_names_nothing(forensics(_aggregate(list(c.values()), "mean"), c, "mean"))
    f = forensics(_aggregate([v for k, v in c.items() if k != "leaf-0"], "mean"), c, "mean")
    assert f.dropped == ["leaf-0"] and f.misweighted == []


def test_median_correct_is_not_flagged_but_averaging_instead_is_said() -> None:
    c = _contributions()
    ok = forensics(_aggregate(list(c.values()), "median"), c, "median")
    _assert_names_nothing(ok)
    assert "not a weighted mean of the uploads, as expected for median" in ok.summary
    wrong = forensics(_aggregate(list(c.values()), "fedavg"), c, "median")
    assert "the platform probably averaged instead of computing the median" in wrong.summary


def test_garbage_aggregate_is_not_blamed_on_a_leaf() -> None:
    c = _contributions()
    rng = np.random.default_rng(0)
    garbage = [rng.random(x.shape).astype(x.dtype) for x in next(iter(c.values()))[1]]
    f = forensics(garbage, c, "fedavg")
    assert f.dropped == [] and f.double_counted == [] and f.misweighted == []
    assert f.summary.startswith("The aggregate is not a weighted mean of this round's uploads")


def test_nan_in_the_aggregate_is_said_not_read_as_a_perfect_fit() -> None:
    c = _contributions()
    agg = _aggregate(list(c.values()), "fedavg")
    agg[0] = agg[0].copy()
    agg[0][:2, :3] = np.nan
    agg[1] = agg[1].copy()
    agg[1][0] = np.inf
    f = forensics(agg, c, "fedavg")
    assert f.summary == "Forensics not possible: the aggregate holds 7 NaN or infinite values."
    assert not f.found_fault


def test_too_few_coordinates_says_so() -> None:
    c = _contributions(n=N)
    small = ModelSpec(layers=(LayerSpec(shape=(4,), dtype="float32"),))
    cs = {k: (w, leaf_update(5, i, 1, None, small)) for i, (k, (w, _)) in enumerate(c.items())}
    f = forensics(_aggregate(list(cs.values()), "fedavg"), cs, "fedavg")
    assert f.summary.startswith(f"Forensics not possible: forensics needs at least {N}")
    assert f.effective_weights == {}


def test_aggregate_of_another_shape_is_not_fitted() -> None:
    c = _contributions()
    wrong = _aggregate(list(c.values()), "fedavg")[:2]
    f = forensics(wrong, c, "fedavg")
    assert f.summary.startswith("Forensics not possible: leaf leaf-0's upload has layer shapes")
    assert not f.found_fault


def test_each_contribution_is_read_once_so_a_lazy_mapping_works() -> None:
    weights = {f"leaf-{i}": float(i + 1) for i in range(N)}
    reads: list[str] = []

    class Lazy(Mapping[str, tuple[float, list[np.ndarray]]]):
        def __getitem__(self, key: str) -> tuple[float, list[np.ndarray]]:
            reads.append(key)
            return weights[key], leaf_update(8, int(key[5:]), 1, None, MODEL)

        def __iter__(self) -> Iterator[str]:
            return iter(weights)

        def __len__(self) -> int:
            return len(weights)

    lazy = Lazy()
    agg = _aggregate([lazy[k] for k in weights], "fedavg")
    reads.clear()
    f = forensics(agg, lazy, "fedavg")
    assert sorted(reads) == sorted(weights)
    _assert_names_nothing(f)
    json.dumps(f.to_dict())
