"""Issue 17's streaming pieces, each against its whole-array counterpart.

The archive writer and reader (``bk_sim.npzstream``), chunked regeneration
(``leaf_update_chunks``, ``SharedDraws``), the platform's chunked aggregation
(``aggregate_to_file``), the validator's chunked comparison (``compare_chunked``), the
client's streaming multipart body, and the refusal of a scenario that cannot fit.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bk_sim import npzstream, weights
from bk_sim.client._stream import check_weights_file, multipart_file_body
from bk_sim.engine import platform_limits, preflight
from bk_sim.errors import ScenarioError, WeightsFormatError
from bk_sim.platform._aggregate import Upload, aggregate
from bk_sim.platform._chunked import aggregate_to_file
from bk_sim.scenario import LayerSpec, ModelSpec, scenario_from_dict
from bk_sim.synth import SharedDraws, leaf_update, leaf_update_chunks
from bk_sim.validate import compare, compare_chunked, reference_aggregate

MODEL = ModelSpec(
    layers=(
        LayerSpec(shape=(300, 1000), dtype="float32"),
        LayerSpec(shape=(77,), dtype="float16"),
        LayerSpec(shape=(5, 5), dtype="int32"),
        LayerSpec(shape=(1000,), dtype="float64"),
    )
)


def _sha(path: Path) -> str:
    return "sha256=" + base64.b64encode(hashlib.sha256(path.read_bytes()).digest()).decode()


@pytest.mark.parametrize("compression", ["fast", "stored"])
def test_streamed_archive_reads_back_everywhere_and_its_digest_is_the_files(
    tmp_path: Path, compression: str
) -> None:
    layers = leaf_update(1, 2, 1, None, MODEL)
    path = tmp_path / "u.npz"
    with npzstream.NpzWriter(path, compression) as w:
        w.add_array("weighting", np.array([3.5]))
        for i, x in enumerate(layers):
            flat = x.reshape(-1)
            w.add(f"layer_{i}", x.dtype, x.shape, [flat[:7], flat[7:1000], flat[1000:]])
    assert w.digest == _sha(path) and w.size == path.stat().st_size
    weighting, back = weights.read_weights(path)  # zipfile / numpy
    fast_w, fast = weights.read_weights_fast(path)  # the platform's reader
    assert weighting == fast_w == 3.5
    for x, a, b, c in zip(layers, back, fast, npzstream.load_layers(path), strict=True):
        assert np.array_equal(x, a) and np.array_equal(x, b) and np.array_equal(x, c)
    assert check_weights_file(path) == "federated_learning"


def test_writer_refuses_chunks_that_do_not_fill_the_shape(tmp_path: Path) -> None:
    with pytest.raises(WeightsFormatError, match="needs"):
        with npzstream.NpzWriter(tmp_path / "x.npz") as w:
            w.add("layer_0", np.dtype(np.float32), (10,), [np.zeros(9, np.float32)])


def test_client_check_refuses_nan_streaming(tmp_path: Path) -> None:
    path = tmp_path / "nan.npz"
    bad = np.ones(50, np.float32)
    bad[33] = np.nan
    weights.save_weights(path, 1.0, [bad], compression="fast")
    with pytest.raises(WeightsFormatError, match="NaN"):
        check_weights_file(path)


@pytest.mark.parametrize("base_round", [None, 1])
def test_chunks_concatenate_to_leaf_update_bit_for_bit(base_round: int | None) -> None:
    base = None if base_round is None else leaf_update(1, 0, base_round, None, MODEL)
    shared = SharedDraws()
    streams = [leaf_update_chunks(1, leaf, 2, base, MODEL, chunk=1234, shared=shared)
               for leaf in range(3)]  # fmt: skip
    got: list[list[list[np.ndarray]]] = [[[] for _ in MODEL.layers] for _ in range(3)]
    for j in range(len(MODEL.layers)):  # lockstep, as the validator advances them
        while (pieces := [next(s[j], None) for s in streams])[0] is not None:
            for leaf, piece in enumerate(pieces):
                assert piece is not None
                got[leaf][j].append(piece)
    for leaf in range(3):
        whole = leaf_update(1, leaf, 2, base, MODEL)
        for x, parts in zip(whole, got[leaf], strict=True):
            joined = np.concatenate(parts)
            assert joined.dtype == x.dtype
            assert joined.view(np.uint8).tobytes() == x.reshape(-1).view(np.uint8).tobytes()


@pytest.mark.parametrize("strategy", ["fedavg", "mean", "median", "trimmed_mean"])
def test_chunked_aggregation_equals_the_in_memory_one(tmp_path: Path, strategy: str) -> None:
    rng = np.random.default_rng(0)
    ups = []
    for i in range(5):
        layers = [
            rng.random((300, 700), dtype=np.float32),
            rng.integers(0, 9, (13,), dtype=np.int16),
            rng.random(5).astype(np.float16),
        ]
        comp: Any = ["fast", "stored", "faithful"][i % 3]
        path = weights.save_weights(tmp_path / f"u{i}.npz", float(i + 1), layers, compression=comp)
        ups.append(Upload(f"l{i}", path, float(i + 1)))
    expected = aggregate(ups, strategy, trim_fraction=0.2)
    aggregate_to_file(ups, strategy, tmp_path / "out.npz", trim_fraction=0.2)
    for x, y in zip(expected, weights.read_layers(tmp_path / "out.npz"), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_chunked_aggregation_names_the_leaf_whose_layout_differs(tmp_path: Path) -> None:
    a = weights.save_weights(tmp_path / "a.npz", 1.0, [np.zeros(4, np.float32)])
    b = weights.save_weights(tmp_path / "b.npz", 1.0, [np.zeros(5, np.float32)])
    from bk_sim.errors import AggregationError

    with pytest.raises(AggregationError, match="leaf B, layer_0: shape"):
        aggregate_to_file([Upload("A", a, 1.0), Upload("B", b, 1.0)], "fedavg", tmp_path / "o")


def _contributions(shared: SharedDraws, chunk: int = 997) -> list[tuple[float, Any]]:
    return [
        (float(w), leaf_update_chunks(1, leaf, 1, None, MODEL, chunk=chunk, shared=shared))
        for leaf, w in enumerate([3.0, 1.0, 7.5])
    ]


def test_chunked_comparison_agrees_with_the_whole_model_one() -> None:
    whole = [(w, leaf_update(1, leaf, 1, None, MODEL)) for leaf, w in enumerate([3.0, 1.0, 7.5])]
    ref = reference_aggregate(whole, "fedavg")
    actual = [
        (r if d.kind == "f" else np.rint(r)).astype(d) for r, d in zip(ref, ref.dtypes, strict=True)
    ]
    dtypes = [np.dtype(layer.dtype) for layer in MODEL.layers]
    streamed = compare_chunked(
        _contributions(SharedDraws()), actual, weighted=True, expected_dtypes=dtypes,
        rtol=None, atol=None,
    )  # fmt: skip
    full = compare(ref, actual, rtol=None, atol=None)
    assert streamed.passed and full.passed
    assert streamed.max_abs_error == pytest.approx(full.max_abs_error, rel=1e-9, abs=1e-30)
    assert streamed.max_rel_error == pytest.approx(full.max_rel_error, rel=1e-9, abs=1e-30)
    wrong = [x.copy() for x in actual]
    wrong[0].reshape(-1)[123_456] += np.float32(1e-3)
    failed = compare_chunked(
        _contributions(SharedDraws()), wrong, weighted=True, expected_dtypes=dtypes,
        rtol=None, atol=None,
    )  # fmt: skip
    assert not failed.passed and failed.reason is not None
    assert failed.reason.startswith("layer_0: 1 of") and failed.layers[0].mismatched == 1


def test_multipart_body_streams_what_urllib3_would_encode(tmp_path: Path) -> None:
    path = tmp_path / "f.npz"
    path.write_bytes(bytes(range(256)) * 1000)
    body, ctype = multipart_file_body('{"leaf_name": "x"}', path)
    boundary = ctype.split("boundary=")[1]
    whole = b"".join(body)
    assert len(whole) == len(body)
    assert b"".join(body) == whole  # a retry iterates again from the top
    assert whole.startswith(f"--{boundary}\r\n".encode())
    assert whole.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert path.read_bytes() in whole
    body.close()


def _scenario(tmp_path: Path, **platform: Any) -> Any:
    return scenario_from_dict(
        {
            "name": "fit",
            "leaves": {"count": 4},
            "model": {"layers": [{"shape": [1000, 1000], "dtype": "float32"}]},
            "platform": {"mode": "local", **platform},
            "report": {"dir": str(tmp_path)},
        }
    )


def test_platform_limits_follow_the_model_unless_set(tmp_path: Path) -> None:
    lim = platform_limits(_scenario(tmp_path))
    assert lim.max_upload_bytes == 512 * 2**20  # defaults hold when the model fits them
    big = scenario_from_dict(
        {
            "name": "big",
            "leaves": {"count": 2},
            "model": {"layers": [{"shape": [25000, 10000], "dtype": "float32"}]},
        }
    )
    lim = platform_limits(big)
    assert lim.max_upload_bytes > 10**9 and lim.max_decompressed_bytes > 10**9
    assert lim.max_upload_bytes >= lim.upload_needs


def test_a_model_over_an_explicit_limit_is_refused_before_the_run(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"raise platform.max_decompressed_bytes to at least"):
        preflight(_scenario(tmp_path, max_decompressed_bytes=1000), tmp_path)
    with pytest.raises(ScenarioError, match=r"platform.max_upload_bytes: .* over the limit of"):
        preflight(_scenario(tmp_path, max_upload_bytes=1000), tmp_path)
    preflight(_scenario(tmp_path), tmp_path)  # fits


def test_a_model_over_the_machines_memory_is_refused_with_the_numbers(tmp_path: Path) -> None:
    huge = scenario_from_dict(
        {
            "name": "huge",
            "leaves": {"count": 2},
            "model": {"layers": [{"shape": [100000, 100000], "dtype": "float32"}]},
            "report": {"dir": str(tmp_path)},
        }
    )
    with pytest.raises(ScenarioError, match=r"of memory .* is available; lower leaves.count"):
        preflight(huge, tmp_path)
