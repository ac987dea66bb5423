"""Read an uploaded .npz from disk member by member, in bounded chunks.

``validate_stored`` is the platform's strict validation (the rules of
``bk_sim.weights.validate_weights(strict=True)``) without ever holding a decoded member:
each member is inflated ``CHUNK_BYTES`` at a time, its CRC, size and (for float layers)
finiteness checked on the fly, so a 1.8 MB archive that inflates to 1.9 GB costs a few
MiB of memory, not 2 GB. ``iter_chunks`` gives the same decoded chunks to a consumer (an
aggregation that adds an upload chunk by chunk into its accumulator).

Only what a weights archive needs is accepted: stored or deflated ``.npy`` members,
unencrypted, at most ``MAX_MEMBERS`` of them; anything else is refused with its reason.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import numpy as np
from isal import isal_zlib

from bk_sim.errors import WeightsFormatError
from bk_sim.npzstream import NpzMember as Member  # one description of a member
from bk_sim.weights import WeightsInfo

#: Decoded bytes handed out (and checked) at a time.
CHUNK_BYTES = 4 * 2**20
#: Compressed bytes read from disk at a time.
READ_BYTES = 1 * 2**20
#: More members than any model has layers; the central directory is parsed only below it.
MAX_MEMBERS = 10_000
_MAX_NPY_HEADER = 65536
_EOCD = b"PK\x05\x06"
_LAYER_RE = re.compile(r"^layer_(0|[1-9][0-9]*)$")
#: What a corrupt deflate stream raises (ISA-L's error is untyped for mypy).
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    cast("type[BaseException]", isal_zlib.error),
)


def _entry_count(f: BinaryIO, file_size: int) -> int | None:
    """Entries the end-of-central-directory record declares (None: ZIP64 or not found)."""
    tail_len = min(file_size, 65536 + 22)
    f.seek(file_size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        return None
    total = int(struct.unpack_from("<H", tail, at + 10)[0])
    return None if total == 0xFFFF else int(total)


def _local_data_offset(f: BinaryIO, info: zipfile.ZipInfo, where: str) -> int:
    f.seek(info.header_offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise WeightsFormatError(f"{where}: member {info.filename!r} has a bad local header")
    flags = struct.unpack_from("<H", head, 6)[0]
    if flags & 1:
        raise WeightsFormatError(f"{where}: member {info.filename!r} is encrypted")
    name_len, extra_len = struct.unpack_from("<HH", head, 26)
    return int(info.header_offset + 30 + name_len + extra_len)


class _Inflater:
    """Decoded bytes of one member, at most ``CHUNK_BYTES`` at a time, size- and CRC-checked."""

    def __init__(self, f: BinaryIO, member: Member, where: str) -> None:
        self._f = f
        self._m = member
        self._where = where

    def __iter__(self) -> Iterator[bytes]:
        m, f = self._m, self._f
        f.seek(m.data_offset)
        left = m.compressed_size
        produced = 0
        crc = 0
        inflater = isal_zlib.decompressobj(-15) if m.method == zipfile.ZIP_DEFLATED else None
        while left > 0 or (inflater is not None and inflater.unconsumed_tail):
            if inflater is not None and inflater.unconsumed_tail:
                data = inflater.unconsumed_tail
            else:
                data = f.read(min(READ_BYTES, left))
                if not data:
                    raise WeightsFormatError(f"{self._where}: member {m.key!r} is truncated")
                left -= len(data)
            if inflater is None:
                out = data
            else:
                out = inflater.decompress(data, CHUNK_BYTES)
            if not out:
                continue
            produced += len(out)
            if produced > m.size:
                raise WeightsFormatError(
                    f"{self._where}: member {m.key!r} inflates past its declared size"
                )
            crc = zlib.crc32(out, crc)
            yield out
        if inflater is not None:
            rest = inflater.flush()
            produced += len(rest)
            if rest:
                crc = zlib.crc32(rest, crc)
                if produced > m.size:
                    raise WeightsFormatError(
                        f"{self._where}: member {m.key!r} inflates past its declared size"
                    )
                yield rest
        if produced != m.size or crc != m.crc:
            raise WeightsFormatError(f"{self._where}: member {m.key!r} is corrupt (size or CRC)")


def _parse_header(head: bytes, key: str, where: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        else:
            raise WeightsFormatError(f"{where}: member {key!r} has .npy version {version}")
    except WeightsFormatError:
        raise
    except (ValueError, EOFError, SyntaxError, TypeError, UnicodeDecodeError) as exc:
        raise WeightsFormatError(f"{where}: member {key!r} has a bad .npy header: {exc}") from exc
    if dtype.hasobject:
        raise WeightsFormatError(f"{where}: member {key!r} cannot load without pickle")
    return dtype, tuple(int(d) for d in shape), bool(fortran), buf.tell()


def read_members(f: BinaryIO, where: str, max_decompressed: int | None) -> list[Member]:
    """Every member's location and .npy header; refuses what a weights archive never is."""
    f.seek(0, io.SEEK_END)
    file_size = f.tell()
    count = _entry_count(f, file_size)
    if count is not None and count > MAX_MEMBERS:
        raise WeightsFormatError(f"{where}: {count} members, over the limit of {MAX_MEMBERS}")
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile as exc:
        raise WeightsFormatError(f"{where}: not an .npz (ZIP) archive: {exc}") from exc
    except (ValueError, EOFError, struct.error, OSError) as exc:
        raise WeightsFormatError(f"{where}: truncated or corrupt archive: {exc}") from exc
    if len(infos) > MAX_MEMBERS:
        raise WeightsFormatError(f"{where}: {len(infos)} members, over the limit of {MAX_MEMBERS}")
    total = sum(i.file_size for i in infos)
    if max_decompressed is not None and total > max_decompressed:
        raise WeightsFormatError(
            f"{where}: decompresses to {total} bytes, over the limit of {max_decompressed}"
        )
    members: list[Member] = []
    seen: set[str] = set()
    for info in infos:
        name = info.filename
        if not name.endswith(".npy"):
            raise WeightsFormatError(f"{where}: member {name!r} is not .npy")
        key = name[: -len(".npy")]
        if key in seen:
            raise WeightsFormatError(f"{where}: member {name!r} appears twice")
        seen.add(key)
        if info.flag_bits & 1:
            raise WeightsFormatError(f"{where}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise WeightsFormatError(
                f"{where}: member {name!r} uses compression method {info.compress_type}; "
                "only stored and deflated are accepted"
            )
        offset = _local_data_offset(f, info, where)
        if offset + info.compress_size > file_size:
            raise WeightsFormatError(f"{where}: member {name!r} is truncated")
        partial = Member(
            key, info.compress_type, offset, info.compress_size, info.file_size, info.CRC,
            np.dtype(np.uint8), (), False, 0,
        )  # fmt: skip
        head = bytearray()
        try:
            for chunk in _Inflater(f, partial, where):
                head += chunk
                if len(head) >= _MAX_NPY_HEADER or len(head) >= info.file_size:
                    break
        except WeightsFormatError as exc:
            if "corrupt" not in str(exc):  # a CRC needs the whole member: checked later
                raise
        except _INFLATE_ERRORS as exc:
            raise WeightsFormatError(f"{where}: member {name!r} is corrupt: {exc}") from exc
        dtype, shape, fortran, header_len = _parse_header(bytes(head), key, where)
        if math.prod(shape) * dtype.itemsize != info.file_size - header_len:
            raise WeightsFormatError(f"{where}: member {name!r} holds the wrong number of bytes")
        members.append(
            Member(
                key,
                info.compress_type,
                offset,
                info.compress_size,
                info.file_size,
                info.CRC,
                dtype,
                shape,
                fortran,
                header_len,
            )  # fmt: skip
        )
    return members


def iter_chunks(f: BinaryIO, member: Member, where: str) -> Iterator[np.ndarray]:
    """The member's values as flat arrays of at most about ``CHUNK_BYTES`` each.

    Values come in storage order (Fortran order for a ``fortran`` member). The member's
    size and CRC are checked as the last chunk is produced: a consumer must treat the
    data as untrusted until the iterator finishes without raising.
    """
    skip = member.header_len
    carry = b""
    item = member.dtype.itemsize
    try:
        for raw in _Inflater(f, member, where):
            if skip:
                cut = min(skip, len(raw))
                raw, skip = raw[cut:], skip - cut
            data = carry + raw if carry else raw
            usable = len(data) - len(data) % item if item else 0
            if usable:
                yield np.frombuffer(data, dtype=member.dtype, count=usable // item)
            carry = data[usable:]
    except _INFLATE_ERRORS as exc:
        raise WeightsFormatError(f"{where}: member {member.key!r} is corrupt: {exc}") from exc


def validate_stored(path: Path, max_decompressed: int | None) -> WeightsInfo:
    """Strict validation of a stored upload, streaming: what ``validate_weights`` checks."""
    where = "archive"
    try:
        with open(path, "rb") as f:
            members = {m.key: m for m in read_members(f, where, max_decompressed)}
            weighting = _weighting(f, members, where)
            keys = sorted(
                (k for k in members if _LAYER_RE.match(k)), key=lambda k: int(k[len("layer_") :])
            )
            if not keys:
                raise WeightsFormatError("archive holds no layer_* arrays")
            expected = [f"layer_{i}" for i in range(len(keys))]
            if keys != expected:
                missing = sorted(set(expected) - set(keys), key=lambda k: int(k[6:]))
                raise WeightsFormatError(
                    f"layer indices must run from 0 without gaps; missing {', '.join(missing)}"
                )
            extra = sorted(set(members) - set(keys) - {"weighting"})
            if extra:
                raise WeightsFormatError(f"unexpected arrays in archive: {', '.join(extra)}")
            for k in keys:
                m = members[k]
                if m.dtype.kind not in "biuf":
                    raise WeightsFormatError(f"{k} has dtype {m.dtype}; layers must be numeric")
                for chunk in iter_chunks(f, m, where):
                    if m.dtype.kind == "f" and not np.isfinite(chunk).all():
                        raise WeightsFormatError(f"{k} holds NaN or infinite values")
    except OSError as exc:
        raise WeightsFormatError(f"{where}: cannot read the stored upload: {exc}") from exc
    return WeightsInfo(
        weighting=weighting,
        shapes=tuple(members[k].shape for k in keys),
        dtypes=tuple(members[k].dtype.str for k in keys),
    )


def _weighting(f: BinaryIO, members: dict[str, Member], where: str) -> float:
    m = members.get("weighting")
    if m is None:
        raise WeightsFormatError("archive has no 'weighting' array")
    count = math.prod(m.shape)
    if count != 1:
        raise WeightsFormatError(f"weighting must hold exactly one value, holds {count}")
    if m.dtype.kind not in "biuf":
        raise WeightsFormatError(f"weighting must be numeric, has dtype {m.dtype}")
    values = [c for c in iter_chunks(f, m, where) if c.size]
    value = float(values[0][0])
    if not (math.isfinite(value) and value > 0):
        raise WeightsFormatError(f"weighting must be finite and > 0, got {value!r}")
    return value
