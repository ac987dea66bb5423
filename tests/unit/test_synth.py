"""Synthetic weights: deterministic to the byte, dtype-faithful, and useful for forensics."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from bk_sim.errors import ScenarioError
from bk_sim.scenario import (
    DTYPES,
    PRESETS,
    LayerSpec,
    ModelSpec,
    WeightingSpec,
)
from bk_sim.synth import initial_model, leaf_update, leaf_weightings


def _preset(name: str) -> ModelSpec:
    return ModelSpec(
        layers=tuple(LayerSpec(shape=s, dtype=d) for s, d in PRESETS[name]), preset=name
    )


ALL_DTYPES = ModelSpec(
    layers=tuple(LayerSpec(shape=(3, 5), dtype=d) for d in DTYPES)
    + (LayerSpec(shape=(), dtype="int64"), LayerSpec(shape=(2, 2, 2, 2), dtype="float16"))
)


def _digest(layers: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for x in layers:
        h.update(str((x.dtype.str, x.shape)).encode())
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def test_same_inputs_give_identical_bytes_in_another_process() -> None:
    model = _preset("small")
    here = _digest(leaf_update(11, 3, 2, None, model))
    assert here == _digest(leaf_update(11, 3, 2, None, model))
    code = (
        "import hashlib, numpy as np\n"
        "from bk_sim.scenario import LayerSpec, ModelSpec, PRESETS\n"
        "from bk_sim.synth import leaf_update\n"
        "m = ModelSpec(layers=tuple(LayerSpec(shape=s, dtype=d) for s, d in PRESETS['small']))\n"
        "h = hashlib.sha256()\n"
        "for x in leaf_update(11, 3, 2, None, m):\n"
        "    h.update(str((x.dtype.str, x.shape)).encode())\n"
        "    h.update(np.ascontiguousarray(x).tobytes())\n"
        "print(h.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_every_input_matters() -> None:
    model = _preset("tiny")
    ref = _digest(leaf_update(1, 0, 1, None, model))
    assert _digest(leaf_update(2, 0, 1, None, model)) != ref  # seed
    assert _digest(leaf_update(1, 1, 1, None, model)) != ref  # leaf
    assert _digest(leaf_update(1, 0, 2, None, model)) != ref  # round
    other_base = [x + 1 for x in initial_model(1, model)]
    assert _digest(leaf_update(1, 0, 1, other_base, model)) != ref  # base


def test_dtypes_and_shapes_are_kept() -> None:
    base = initial_model(5, ALL_DTYPES)
    for layers in (base, leaf_update(5, 2, 1, base, ALL_DTYPES)):
        assert [x.dtype.name for x in layers] == [layer.dtype for layer in ALL_DTYPES.layers]
        assert [x.shape for x in layers] == [layer.shape for layer in ALL_DTYPES.layers]
        for x in layers:
            assert np.isfinite(x.astype(np.float64)).all()


def test_integer_layers_stay_integers_within_their_range() -> None:
    model = ModelSpec(
        layers=(LayerSpec(shape=(1000,), dtype="uint8"), LayerSpec(shape=(1000,), dtype="int8"))
    )
    base = [np.zeros(1000, np.uint8), np.full(1000, 127, np.int8)]
    up = leaf_update(3, 0, 1, base, model)
    assert up[0].dtype == np.uint8 and up[1].dtype == np.int8
    assert up[0].min() == 0 and up[0].max() <= 2  # clipped at 0, never wrapped to 255
    assert up[1].max() == 127 and up[1].min() >= 125  # clipped at 127, never wrapped
    assert (up[0] > 0).any() and (up[1] < 127).any()  # a step happened


def test_leaves_are_linearly_independent_and_rounds_move_the_aggregate() -> None:
    model = _preset("cnn_small")
    n = 12
    ups = [leaf_update(4, i, 1, None, model) for i in range(n)]
    flat = np.stack([np.concatenate([x.ravel() for x in u if x.dtype.kind == "f"]) for u in ups])
    sample = flat[:, :: max(1, flat.shape[1] // 500)].astype(np.float64)
    singular = np.linalg.svd(sample, compute_uv=False)
    assert singular[-1] / singular[0] > 1e-3  # well conditioned for least squares
    agg1 = [
        np.mean([u[k] for u in ups], axis=0).astype(ups[0][k].dtype) for k in range(len(ups[0]))
    ]
    ups2 = [leaf_update(4, i, 2, agg1, model) for i in range(n)]
    agg2 = [np.mean([u[k] for u in ups2], axis=0) for k in range(len(ups2[0]))]
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(agg1, agg2, strict=True))
    assert moved > 1e-3


def test_base_that_does_not_fit_the_model_is_refused() -> None:
    model = _preset("tiny")
    with pytest.raises(ValueError, match="base has 1 layers"):
        leaf_update(1, 0, 1, [np.zeros(3)], model)
    bad = initial_model(1, model)
    bad[0] = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"base layer_0 has shape \(2, 2\)"):
        leaf_update(1, 0, 1, bad, model)
    with pytest.raises(ValueError, match="1-based"):
        leaf_update(1, 0, 0, None, model)


@pytest.mark.parametrize(
    "spec",
    [
        WeightingSpec(distribution="fixed", value=3.0),
        WeightingSpec(distribution="uniform", low=2.0, high=9.0),
        WeightingSpec(distribution="lognormal", mu=6.0, sigma=1.0),
        WeightingSpec(distribution="list", values=(1.0, 2.0, 3.0, 4.0, 5.0)),
    ],
    ids=lambda s: s.distribution,
)
def test_weightings_are_finite_positive_and_deterministic(spec: WeightingSpec) -> None:
    w = leaf_weightings(9, spec, 5)
    assert w.dtype == np.float64 and w.shape == (5,)
    assert np.isfinite(w).all() and (w > 0).all()
    np.testing.assert_array_equal(w, leaf_weightings(9, spec, 5))
    if spec.distribution == "uniform":
        assert (w >= 2.0).all() and (w <= 9.0).all() and len(set(w.tolist())) == 5
    if spec.distribution == "list":
        np.testing.assert_array_equal(w, [1, 2, 3, 4, 5])


def test_weightings_that_overflow_are_a_scenario_error() -> None:
    with pytest.raises(ScenarioError, match="not finite and > 0"):
        leaf_weightings(1, WeightingSpec(distribution="lognormal", mu=800.0, sigma=1.0), 4)
