"""The weights file format (PROTOCOL.md section 3) in one place.

Client, platform and validator all read and write weights through this module, so the
format has one definition. An upload is a NumPy ``.npz`` holding ``weighting`` (float64,
one element) and ``layer_0``, ``layer_1``, ...; an aggregate is the same without
``weighting``. Layers are always returned in index order (``layer_10`` after ``layer_9``).

Compression choices:

- ``faithful``: ``numpy.savez_compressed`` (zlib level 6), byte for byte what the
  published client writes;
- ``fast``: ISA-L deflate level 1 in an ordinary ZIP (any zlib, so ``np.load``, reads it);
  about 20x faster than ``faithful`` on weight-like data (see PERFORMANCE.md);
- ``stored``: ``numpy.savez``, no compression.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from isal import isal_zlib

from bk_sim.errors import WeightsFormatError
from bk_sim.files import atomic_write

Compression = Literal["faithful", "fast", "stored"]
COMPRESSIONS: tuple[Compression, ...] = ("faithful", "fast", "stored")

WEIGHTING_KEY = "weighting"
_LAYER_RE = re.compile(r"^layer_(0|[1-9][0-9]*)$")
_FAST_LEVEL = 1
_ZIP32_LIMIT = 0xFFFFFFFF
_ISAL_ERROR = cast("type[Exception]", isal_zlib.error)  # untyped in isal's stubs

Source = str | Path | bytes | bytearray | memoryview


@dataclass(frozen=True)
class WeightsInfo:
    """What validation learned about an archive, without keeping its arrays."""

    weighting: float | None
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @property
    def layer_count(self) -> int:
        return len(self.shapes)


def layer_key(index: int) -> str:
    return f"layer_{index}"


def sorted_layer_keys(keys: Sequence[str]) -> list[str]:
    """The ``layer_<n>`` keys among ``keys``, ordered by n (not by string)."""
    found = [(int(m.group(1)), k) for k in keys if (m := _LAYER_RE.match(k))]
    return [k for _, k in sorted(found)]


def digest_header(data: bytes | bytearray | memoryview) -> str:
    """The ``x-bk-file-digest`` value: ``sha256=`` + base64 of the raw SHA-256."""
    return "sha256=" + base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


# --------------------------------------------------------------------------- writing


def encode_weights(
    weighting: float,
    parameters: Sequence[np.ndarray],
    *,
    compression: Compression = "faithful",
) -> bytes:
    """An upload archive (``weighting`` + layers) as bytes."""
    arrays = {WEIGHTING_KEY: _weighting_array(weighting)}
    arrays.update(_layer_dict(parameters))
    return _encode(arrays, compression)


def encode_layers(layers: Sequence[np.ndarray], *, compression: Compression = "faithful") -> bytes:
    """An aggregate archive (layers only) as bytes."""
    return _encode(_layer_dict(layers), compression)


def save_weights(
    path: str | os.PathLike[str],
    weighting: float,
    parameters: Sequence[np.ndarray],
    *,
    compression: Compression = "faithful",
) -> Path:
    """Write an upload archive; appends ``.npz`` when missing and returns the path.

    The file is written to a temporary name and renamed, so a reader never sees half a
    file.
    """
    target = Path(path)
    if target.suffix != ".npz":
        target = target.with_name(target.name + ".npz")
    data = encode_weights(weighting, parameters, compression=compression)
    atomic_write(target, data)
    return target


def save_layers(
    path: str | Path, layers: Sequence[np.ndarray], *, compression: Compression = "faithful"
) -> Path:
    """Write an aggregate archive atomically and return its path."""
    target = Path(path)
    atomic_write(target, encode_layers(layers, compression=compression))
    return target


def _weighting_array(weighting: float) -> np.ndarray:
    try:
        value = float(weighting)
    except (TypeError, ValueError) as exc:
        raise WeightsFormatError(f"weighting must be a number, got {weighting!r}") from exc
    return np.array([value], dtype=np.float64)


def _layer_dict(parameters: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    if len(parameters) == 0:
        raise WeightsFormatError("at least one layer is required, got none")
    layers: dict[str, np.ndarray] = {}
    for i, p in enumerate(parameters):
        arr = np.asarray(p)
        if arr.dtype.kind not in "biuf":
            raise WeightsFormatError(
                f"layer {i} has dtype {arr.dtype}; layers must be numeric (bool, int, float)"
            )
        layers[layer_key(i)] = arr
    return layers


def _encode(arrays: Mapping[str, np.ndarray], compression: Compression) -> bytes:
    if compression == "faithful":
        buf = io.BytesIO()
        np.savez_compressed(buf, **cast("dict[str, Any]", arrays))
        return buf.getvalue()
    if compression == "stored":
        buf = io.BytesIO()
        np.savez(buf, **cast("dict[str, Any]", arrays))
        return buf.getvalue()
    if compression == "fast":
        return _fast_zip(arrays)
    raise WeightsFormatError(
        f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}"
    )


def _npy_parts(arr: np.ndarray) -> tuple[bytes, memoryview]:
    """The .npy header and the array's raw bytes, without copying the data."""
    arr = np.asarray(arr, order="C")  # unlike ascontiguousarray, keeps 0-d arrays 0-d
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(arr))
    return header.getvalue(), arr.reshape(-1).view(np.uint8).data


def _fast_zip(arrays: Mapping[str, np.ndarray]) -> bytes:
    """A ZIP of ``<key>.npy`` members deflated by ISA-L; readable by any zlib."""
    out = io.BytesIO()
    central: list[bytes] = []
    for key, arr in arrays.items():
        name = f"{key}.npy".encode()
        header, body = _npy_parts(arr)
        comp = isal_zlib.compressobj(_FAST_LEVEL, isal_zlib.DEFLATED, -15)
        deflated = comp.compress(header) + comp.compress(body) + comp.flush()
        crc = zlib.crc32(body, zlib.crc32(header))
        raw_size = len(header) + len(body)
        offset = out.tell()
        if max(raw_size, len(deflated), offset) >= _ZIP32_LIMIT:
            raise WeightsFormatError("fast compression supports archives under 4 GiB")
        # Fixed DOS time 1980-01-01 00:00: archives are a pure function of their arrays.
        fields = (20, 0, zipfile.ZIP_DEFLATED, 0, 0x21, crc, len(deflated), raw_size, len(name))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0))
        out.write(name)
        out.write(deflated)
        central.append(
            struct.pack("<IH", 0x02014B50, 20)
            + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0o600 << 16, offset)
            + name
        )
    cd_offset = out.tell()
    for entry in central:
        out.write(entry)
    cd_size = out.tell() - cd_offset
    n = len(central)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0))
    return out.getvalue()


# --------------------------------------------------------------------------- reading


def read_weights(
    source: Source, *, max_decompressed_bytes: int | None = None
) -> tuple[float, list[np.ndarray]]:
    """An upload's weighting and layers (in index order), validated strictly."""
    arrays = _load(source, max_decompressed_bytes)
    info = _check(arrays, require_weighting=True, strict=True)
    assert info.weighting is not None
    return info.weighting, [arrays[k] for k in sorted_layer_keys(list(arrays))]


def read_layers(source: Source, *, max_decompressed_bytes: int | None = None) -> list[np.ndarray]:
    """The layers of an upload or an aggregate, in index order (``weighting`` ignored)."""
    arrays = _load(source, max_decompressed_bytes)
    keys = sorted_layer_keys(list(arrays))
    if not keys:
        raise WeightsFormatError("archive holds no layer_* arrays")
    return [arrays[k] for k in keys]


def read_weights_fast(
    source: str | Path, *, max_decompressed_bytes: int | None = None
) -> tuple[float, list[np.ndarray]]:
    """``read_weights`` with members inflated by ISA-L (about 2x zlib); arrays are read-only.

    Same strict validation and errors as ``read_weights``; the platform's aggregation reads
    every upload of a round, so inflate speed is its floor. Archives this reader does not
    handle (ZIP64, encryption, other methods, .npy format 3.0) go through ``read_weights``.
    """
    arrays = _load_fast(Path(source), max_decompressed_bytes)
    info = _check(arrays, require_weighting=True, strict=True)
    assert info.weighting is not None
    return info.weighting, [arrays[k] for k in sorted_layer_keys(list(arrays))]


def _load_fast(source: Source, max_decompressed_bytes: int | None) -> dict[str, np.ndarray]:
    """``_load`` through the ISA-L reader where it can (read-only arrays), else ``_load``.

    Besides speed, it refuses a member whose deflate stream goes on past its declared
    size, which ``zipfile``'s bounded read (hence ``_load``) lets through.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw, where = bytes(source), "archive"
    else:
        where = str(source)
        if not Path(source).is_file():
            raise WeightsFormatError(f"{where}: no such file")
        raw = Path(source).read_bytes()
    try:
        arrays = _fast_members(raw, where, max_decompressed_bytes)
    except WeightsFormatError:
        raise
    except zipfile.BadZipFile as exc:
        raise WeightsFormatError(f"{where}: not an .npz (ZIP) archive: {exc}") from exc
    except (ValueError, EOFError, _ISAL_ERROR, struct.error) as exc:
        raise WeightsFormatError(f"{where}: truncated or corrupt archive: {exc}") from exc
    return arrays if arrays is not None else _load(source, max_decompressed_bytes)


def _npy_members(
    zf: zipfile.ZipFile, where: str, max_decompressed_bytes: int | None
) -> list[zipfile.ZipInfo]:
    """The archive's members, all ``.npy`` and together within the decompressed limit."""
    infos = zf.infolist()
    if max_decompressed_bytes is not None:
        total = sum(i.file_size for i in infos)
        if total > max_decompressed_bytes:
            raise WeightsFormatError(
                f"{where}: decompresses to {total} bytes, over the limit of "
                f"{max_decompressed_bytes}"
            )
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise WeightsFormatError(f"{where}: member {info.filename!r} is not .npy")
    return infos


def _fast_members(
    raw: bytes, where: str, max_decompressed_bytes: int | None
) -> dict[str, np.ndarray] | None:
    """Every member of a plain stored/deflated ZIP of .npy files; None if not plain."""
    view = memoryview(raw)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        infos = _npy_members(zf, where, max_decompressed_bytes)
    arrays: dict[str, np.ndarray] = {}
    for info in infos:
        plain = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        if info.flag_bits & 1 or not plain:
            return None
        off = info.header_offset
        if max(off, info.compress_size, info.file_size) >= _ZIP32_LIMIT:
            return None
        sig, name_len, extra_len = struct.unpack_from("<I22xHH", raw, off)
        if sig != 0x04034B50:
            raise WeightsFormatError(f"{where}: member {info.filename!r} has a bad local header")
        start = off + 30 + name_len + extra_len
        data = view[start : start + info.compress_size]
        if info.compress_type == zipfile.ZIP_DEFLATED:
            # Inflate at most the declared size: a stream that goes on past it (a zip bomb
            # with a small declared size passes zipfile's bounded read) is refused, not
            # inflated into memory.
            inflater = isal_zlib.decompressobj(-15)
            body: bytes | memoryview = inflater.decompress(data, max(info.file_size, 1))
            if inflater.decompress(inflater.unconsumed_tail, 1):
                raise WeightsFormatError(
                    f"{where}: member {info.filename!r} inflates past its declared size"
                )
        else:
            body = data
        if len(body) != info.file_size or isal_zlib.crc32(body) != info.CRC:
            raise WeightsFormatError(f"{where}: member {info.filename!r} is corrupt (size or CRC)")
        arr = _npy_from_buffer(body, where, info.filename)
        if arr is None:
            return None
        arrays[info.filename[: -len(".npy")]] = arr
    return arrays


def _npy_from_buffer(body: bytes | memoryview, where: str, name: str) -> np.ndarray | None:
    """The array a .npy buffer holds, without copying; None for header versions >= 3."""
    head = io.BytesIO(body[: min(len(body), 65536 + 16)])
    version = np.lib.format.read_magic(head)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(head)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(head)
    else:
        return None
    if dtype.hasobject:
        raise WeightsFormatError(f"{where}: member {name!r} cannot load without pickle")
    count = math.prod(shape)
    offset = head.tell()
    if len(body) - offset != count * dtype.itemsize:
        raise WeightsFormatError(f"{where}: member {name!r} holds the wrong number of bytes")
    arr = np.frombuffer(body, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def validate_weights(
    source: Source,
    *,
    strict: bool = False,
    max_decompressed_bytes: int | None = None,
) -> WeightsInfo:
    """Check an upload archive and say what is wrong in one sentence.

    Non-strict is the client's check (PROTOCOL.md section 3): loadable without pickle,
    ``weighting`` with one element, at least one ``layer_*``. Strict is the platform's:
    also a finite, positive weighting, contiguous layer indices from 0, no other keys,
    numeric layers with finite values.
    """
    arrays = _load_fast(source, max_decompressed_bytes)
    return _check(arrays, require_weighting=True, strict=strict)


def load_arrays(
    source: Source, *, max_decompressed_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Every array of an archive of either payload kind, loaded without pickle."""
    return _load_fast(source, max_decompressed_bytes)


def check_arrays(arrays: Mapping[str, np.ndarray], *, strict: bool = False) -> WeightsInfo:
    """``validate_weights`` on arrays already loaded (``load_arrays``)."""
    return _check(arrays, require_weighting=True, strict=strict)


def _load(source: Source, max_decompressed_bytes: int | None) -> dict[str, np.ndarray]:
    """Every array of the archive, loaded without pickle."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        fileobj: io.BytesIO | Path = io.BytesIO(bytes(source))
        where = "archive"
    else:
        fileobj = Path(source)
        where = str(source)
        if not fileobj.is_file():
            raise WeightsFormatError(f"{where}: no such file")
    try:
        with zipfile.ZipFile(fileobj) as zf:
            arrays: dict[str, np.ndarray] = {}
            for info in _npy_members(zf, where, max_decompressed_bytes):
                with zf.open(info) as member:
                    arr = np.lib.format.read_array(member, allow_pickle=False)
                if max_decompressed_bytes is not None and arr.nbytes > max_decompressed_bytes:
                    raise WeightsFormatError(f"{where}: member {info.filename!r} is too large")
                arrays[info.filename[: -len(".npy")]] = arr
            return arrays
    except WeightsFormatError:
        raise
    except zipfile.BadZipFile as exc:
        raise WeightsFormatError(f"{where}: not an .npz (ZIP) archive: {exc}") from exc
    except ValueError as exc:
        # numpy raises ValueError for pickled object arrays with allow_pickle=False
        raise WeightsFormatError(f"{where}: cannot load without pickle: {exc}") from exc
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        raise WeightsFormatError(f"{where}: truncated or corrupt archive: {exc}") from exc
    except MemoryError as exc:  # numpy allocates what a member's header claims, then reads
        raise WeightsFormatError(f"{where}: a member declares an array too large: {exc}") from exc


def _check(
    arrays: Mapping[str, np.ndarray], *, require_weighting: bool, strict: bool
) -> WeightsInfo:
    weighting: float | None = None
    if WEIGHTING_KEY in arrays:
        w = arrays[WEIGHTING_KEY]
        if w.size != 1:
            raise WeightsFormatError(f"weighting must hold exactly one value, holds {w.size}")
        if w.dtype.kind not in "biuf":
            raise WeightsFormatError(f"weighting must be numeric, has dtype {w.dtype}")
        weighting = float(w.reshape(-1)[0])
        if strict and not (math.isfinite(weighting) and weighting > 0):
            raise WeightsFormatError(f"weighting must be finite and > 0, got {weighting!r}")
    elif require_weighting:
        raise WeightsFormatError("archive has no 'weighting' array")
    keys = sorted_layer_keys(list(arrays))
    if not keys:
        raise WeightsFormatError("archive holds no layer_* arrays")
    if strict:
        expected = [layer_key(i) for i in range(len(keys))]
        if keys != expected:
            missing = sorted(set(expected) - set(keys), key=lambda k: int(k[6:]))
            raise WeightsFormatError(
                f"layer indices must run from 0 without gaps; missing {', '.join(missing)}"
            )
        extra = sorted(set(arrays) - set(keys) - {WEIGHTING_KEY})
        if extra:
            raise WeightsFormatError(f"unexpected arrays in archive: {', '.join(extra)}")
        for k in keys:
            arr = arrays[k]
            if arr.dtype.kind not in "biuf":
                raise WeightsFormatError(f"{k} has dtype {arr.dtype}; layers must be numeric")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise WeightsFormatError(f"{k} holds NaN or infinite values")
    return WeightsInfo(
        weighting=weighting,
        shapes=tuple(tuple(arrays[k].shape) for k in keys),
        dtypes=tuple(arrays[k].dtype.str for k in keys),
    )
