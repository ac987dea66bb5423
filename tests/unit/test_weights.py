"""The NPZ weights format: round trips, compression choices, every validation failure."""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from bk_sim import weights as W
from bk_sim.errors import WeightsFormatError


def _layers() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.standard_normal((64, 32)).astype(np.float32),
        np.arange(12, dtype=np.int64).reshape(3, 4),
        np.zeros((0, 3), np.float16),
        np.asfortranarray(rng.standard_normal((3, 5))),
        np.array(5, dtype=np.int8),
        np.array([True, False]),
        np.arange(6, dtype=">i4").reshape(2, 3),
    ]


def _npz(**arrays: object) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


@pytest.mark.parametrize("compression", W.COMPRESSIONS)
def test_round_trip_keeps_values_dtypes_and_shapes(compression: W.Compression) -> None:
    layers = _layers()
    data = W.encode_weights(3.5, layers, compression=compression)
    weighting, back = W.read_weights(data)
    assert weighting == 3.5
    assert len(back) == len(layers)
    for a, b in zip(layers, back, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None


def test_faithful_is_what_savez_compressed_writes() -> None:
    layers = _layers()[:2]
    buf = io.BytesIO()
    np.savez_compressed(buf, weighting=np.array([2.0]), layer_0=layers[0], layer_1=layers[1])
    assert W.encode_weights(2.0, layers, compression="faithful") == buf.getvalue()


def test_compression_choices_differ_in_size_and_method() -> None:
    smooth = [np.round(np.linspace(0, 1, 200_000), 2).astype(np.float32)]
    stored = W.encode_weights(1.0, smooth, compression="stored")
    fast = W.encode_weights(1.0, smooth, compression="fast")
    faithful = W.encode_weights(1.0, smooth, compression="faithful")
    assert len(fast) < len(stored) and len(faithful) < len(stored)
    methods = {
        name: {i.compress_type for i in zipfile.ZipFile(io.BytesIO(d)).infolist()}
        for name, d in (("stored", stored), ("fast", fast), ("faithful", faithful))
    }
    assert methods == {
        "stored": {zipfile.ZIP_STORED},
        "fast": {zipfile.ZIP_DEFLATED},
        "faithful": {zipfile.ZIP_DEFLATED},
    }


def test_fast_archive_is_deterministic() -> None:
    layers = _layers()
    assert W.encode_weights(1.0, layers, compression="fast") == W.encode_weights(
        1.0, layers, compression="fast"
    )


def test_unknown_compression_is_refused() -> None:
    with pytest.raises(WeightsFormatError, match="compression must be one of"):
        W.encode_weights(1.0, _layers(), compression="zstd")  # type: ignore[arg-type]


def test_save_weights_appends_suffix_and_returns_path(tmp_path: Path) -> None:
    path = W.save_weights(tmp_path / "model_weights", 10, _layers()[:1])
    assert path == tmp_path / "model_weights.npz" and path.is_file()
    assert W.save_weights(tmp_path / "x.npz", 1, _layers()[:1]) == tmp_path / "x.npz"
    assert not list(tmp_path.glob(".*.tmp"))


def test_layers_are_read_in_index_order_not_string_order() -> None:
    arrays = {f"layer_{i}": np.full(1, i) for i in range(12)}
    data = _npz(weighting=np.array([1.0]), **arrays)
    assert [int(a[0]) for a in W.read_layers(data)] == list(range(12))
    assert W.sorted_layer_keys(["layer_10", "layer_9", "layer_1", "weighting", "layer_x"]) == [
        "layer_1",
        "layer_9",
        "layer_10",
    ]


def test_aggregate_format_has_no_weighting(tmp_path: Path) -> None:
    path = W.save_layers(tmp_path / "agg.npz", _layers()[:2], compression="fast")
    assert sorted(np.load(path).files) == ["layer_0", "layer_1"]
    assert len(W.read_layers(path)) == 2


def test_digest_header_is_base64_sha256() -> None:
    data = b"hello"
    expected = "sha256=" + base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert W.digest_header(data) == expected


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, weighting=np.array([1.0]), layer_0=np.array([{"a": 1}], dtype=object))
    return buf.getvalue()


BAD_ARCHIVES = [
    ("not a zip", lambda: b"definitely not a zip", "not an .npz"),
    ("truncated", lambda: W.encode_weights(1.0, _layers())[:300], "not an .npz"),
    ("pickled", _pickled, "without pickle"),
    ("no weighting", lambda: _npz(layer_0=np.ones(2)), "no 'weighting'"),
    ("two weightings", lambda: _npz(weighting=np.ones(2), layer_0=np.ones(2)), "exactly one"),
    ("no layers", lambda: _npz(weighting=np.ones(1)), "no layer_"),
    ("text weighting", lambda: _npz(weighting=np.array(["a"]), layer_0=np.ones(1)), "numeric"),
]


@pytest.mark.parametrize(
    ("label", "make", "message"), BAD_ARCHIVES, ids=[b[0] for b in BAD_ARCHIVES]
)
def test_every_validation_failure_says_what_is_wrong(label: str, make, message: str) -> None:
    with pytest.raises(WeightsFormatError, match=message):
        W.validate_weights(make())


STRICT_ONLY = [
    ("zero weighting", lambda: _npz(weighting=np.array([0.0]), layer_0=np.ones(2)), "> 0"),
    ("nan weighting", lambda: _npz(weighting=np.array([np.nan]), layer_0=np.ones(2)), "finite"),
    (
        "inf layer",
        lambda: _npz(weighting=np.ones(1), layer_0=np.array([np.inf])),
        "NaN or infinite",
    ),
    (
        "gap",
        lambda: _npz(weighting=np.ones(1), layer_0=np.ones(1), layer_2=np.ones(1)),
        "missing layer_1",
    ),
    (
        "extra",
        lambda: _npz(weighting=np.ones(1), layer_0=np.ones(1), bias=np.ones(1)),
        "unexpected arrays in archive: bias",
    ),
    ("complex", lambda: _npz(weighting=np.ones(1), layer_0=np.ones(1, complex)), "must be numeric"),
]


@pytest.mark.parametrize(("label", "make", "message"), STRICT_ONLY, ids=[b[0] for b in STRICT_ONLY])
def test_strict_validation_is_the_platforms_check(label: str, make, message: str) -> None:
    data = make()
    W.validate_weights(data)  # the client's (published) check lets it through
    with pytest.raises(WeightsFormatError, match=message):
        W.validate_weights(data, strict=True)


def test_decompressed_size_limit_stops_a_zip_bomb_before_inflating() -> None:
    bomb = W.encode_weights(1.0, [np.zeros(4_000_000, np.float32)], compression="fast")
    assert len(bomb) < 100_000
    with pytest.raises(WeightsFormatError, match="over the limit"):
        W.validate_weights(bomb, max_decompressed_bytes=1_000_000)
    assert W.validate_weights(bomb, max_decompressed_bytes=20_000_000).shapes == ((4_000_000,),)


def _lying_size_bomb(extra: int) -> bytes:
    """An upload whose layer_0 stream inflates ``extra`` bytes past its declared size (and
    whose declared size and CRC are those of a small, valid .npy)."""
    import struct
    import zlib

    out, central = io.BytesIO(), []
    for key, arr, trailing in (("weighting", np.ones(1), 0), ("layer_0", np.ones(4), extra)):
        name, npy = f"{key}.npy".encode(), io.BytesIO()
        np.save(npy, arr)
        comp = zlib.compressobj(9, zlib.DEFLATED, -15)
        deflated = comp.compress(npy.getvalue()) + comp.compress(bytes(trailing)) + comp.flush()
        fields = (
            20,
            0,
            8,
            0,
            0x21,
            zlib.crc32(npy.getvalue()),
            len(deflated),
            len(npy.getvalue()),
            len(name),
        )
        central.append(
            struct.pack("<IH", 0x02014B50, 20)
            + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0, out.tell())
            + name
        )
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name + deflated)
    cd_offset = out.tell()
    out.write(b"".join(central))
    out.write(
        struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 2, 2, out.tell() - cd_offset, cd_offset, 0)
    )
    return out.getvalue()


def test_a_member_inflating_past_its_declared_size_is_refused(tmp_path: Path) -> None:
    """zipfile stops at the declared size, so this passed validation, and the platform's
    ISA-L reader then inflated all of it (about 1000x the upload) while aggregating."""
    bomb = _lying_size_bomb(8 * 2**20)
    assert len(bomb) < 20_000
    for limit in (None, 2**20):
        with pytest.raises(WeightsFormatError, match="inflates past its declared size"):
            W.validate_weights(bomb, strict=True, max_decompressed_bytes=limit)
    path = tmp_path / "bomb.npz"
    path.write_bytes(bomb)
    with pytest.raises(WeightsFormatError, match="inflates past its declared size"):
        W.read_weights_fast(path, max_decompressed_bytes=2**20)
    assert W.validate_weights(_lying_size_bomb(0), strict=True).shapes == ((4,),)


def test_a_header_claiming_a_huge_array_is_refused_not_a_memory_error() -> None:
    """numpy allocates what the header claims before reading; through zipfile (here a
    bzip2 member, which the ISA-L reader leaves to it) that was a MemoryError (a 500)."""
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "<f8", "fortran_order": False, "shape": (2**42,)}
    )
    npy.write(bytes(64))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_BZIP2) as zf:
        one = io.BytesIO()
        np.save(one, np.ones(1))
        zf.writestr("weighting.npy", one.getvalue())
        zf.writestr("layer_0.npy", npy.getvalue())
    with pytest.raises(WeightsFormatError, match="declares an array too large"):
        W.validate_weights(buf.getvalue(), strict=True, max_decompressed_bytes=2**20)


def test_non_numeric_layers_are_refused_when_writing() -> None:
    with pytest.raises(WeightsFormatError, match="layer 0 has dtype"):
        W.encode_weights(1.0, [np.array(["a"])])
    with pytest.raises(WeightsFormatError, match="at least one layer"):
        W.encode_weights(1.0, [])
    with pytest.raises(WeightsFormatError, match="weighting must be a number"):
        W.encode_weights("heavy", [np.ones(1)])  # type: ignore[arg-type]


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(WeightsFormatError, match="no such file"):
        W.validate_weights(tmp_path / "absent.npz")


def test_validation_info_describes_the_archive() -> None:
    info = W.validate_weights(W.encode_weights(7, _layers()[:2]), strict=True)
    assert info.weighting == 7.0
    assert info.shapes == ((64, 32), (3, 4))
    assert info.dtypes == ("<f4", "<i8")
    assert info.layer_count == 2


def test_a_failed_save_leaves_no_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bk_sim.files

    def full_disk(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bk_sim.files.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        W.save_weights(tmp_path / "w", 1.0, [np.ones(4)])
    assert list(tmp_path.iterdir()) == []
