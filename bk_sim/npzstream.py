"""Write and read ``.npz`` weights archives a chunk at a time (issue 17).

A 400 MB model must not cost a 400 MB ``bytes`` object per copy: leaves write their
uploads from generated chunks, the client checks and hashes the file it sends in one
streaming pass, and the validator reads an aggregate member by member. The format is the
ordinary one (``bk_sim.weights``): a ZIP of ``<key>.npy`` members, deflated by ISA-L
level 1 (``fast``) or stored. Members are written with a data descriptor (general-purpose
flag bit 3), so the file is written front to back once and its SHA-256 (the
``x-bk-file-digest``) is computed as it is written; every ZIP reader (zipfile, numpy,
the platform's streaming reader) takes the sizes from the central directory.
"""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import zipfile
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, cast

import numpy as np
from isal import isal_zlib

from bk_sim.errors import WeightsFormatError

__all__ = [
    "CHUNK_BYTES",
    "NpzMember",
    "NpzWriter",
    "file_digest",
    "iter_member_chunks",
    "load_layers",
    "read_members",
    "return_freed_chunks",
]

#: Decoded bytes handed out at a time by the readers.
CHUNK_BYTES = 4 * 2**20
_READ_BYTES = 1 * 2**20
_ZIP32_LIMIT = 0xFFFFFFFF
_FAST_LEVEL = 1
_INFLATE_ERRORS: tuple[type[BaseException], ...] = (
    zlib.error,
    cast("type[BaseException]", isal_zlib.error),
)


def file_digest(path: Path) -> tuple[str, int]:
    """``("sha256=<base64>", size)`` of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_READ_BYTES):
            h.update(block)
            size += len(block)
    return "sha256=" + base64.b64encode(h.digest()).decode("ascii"), size


class _HashingFile:
    """Writes through to a file while hashing and counting what was written."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)


class NpzWriter:
    """A ``.npz`` written member by member from chunks; ``digest`` once closed.

    ``compression`` is ``"fast"`` (ISA-L level 1 deflate) or ``"stored"``. The file is
    written to ``path`` directly (the caller owns atomicity: write a temporary name and
    rename it).
    """

    def __init__(self, path: Path, compression: str = "fast") -> None:
        if compression not in ("fast", "stored"):
            raise WeightsFormatError(
                f"streamed archives are written 'fast' or 'stored', not {compression!r}"
            )
        self._method = zipfile.ZIP_DEFLATED if compression == "fast" else zipfile.ZIP_STORED
        self._raw = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._out = _HashingFile(self._raw)
        self._central: list[bytes] = []
        self.digest = ""
        self.size = 0

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._raw.close()

    def add(
        self, key: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]
    ) -> None:
        """One member ``<key>.npy``: its values, in C order, from ``chunks`` (any sizes)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                     "shape": shape}
        )  # fmt: skip
        head = header.getvalue()
        name = f"{key}.npy".encode()
        offset = self._out.size
        deflated = self._method == zipfile.ZIP_DEFLATED
        # Version 20, flag bit 3 (sizes and CRC in a data descriptor), fixed DOS date.
        local = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0x08, self._method, 0, 0x21, 0, 0, 0, len(name), 0
        )
        self._out.write(local + name)
        comp = isal_zlib.compressobj(_FAST_LEVEL, isal_zlib.DEFLATED, -15) if deflated else None
        crc = zlib.crc32(head)
        raw_size = len(head)
        written = 0

        def emit(data: bytes | memoryview) -> None:
            nonlocal written
            out = comp.compress(data) if comp is not None else data
            if out:
                self._out.write(out)
                written += len(out)

        emit(head)
        want = int(np.prod(shape)) * dtype.itemsize
        for chunk in chunks:
            arr = np.ascontiguousarray(chunk, dtype=dtype).reshape(-1)
            body = arr.view(np.uint8).data
            crc = zlib.crc32(body, crc)
            raw_size += arr.nbytes
            emit(body)
        if raw_size - len(head) != want:
            raise WeightsFormatError(
                f"{key}: chunks held {raw_size - len(head)} bytes, shape {shape} needs {want}"
            )
        if comp is not None:
            tail = comp.flush()
            self._out.write(tail)
            written += len(tail)
        if max(raw_size, written, offset) >= _ZIP32_LIMIT:
            raise WeightsFormatError("streamed archives must stay under 4 GiB")
        self._out.write(struct.pack("<IIII", 0x08074B50, crc, written, raw_size))
        fields = (20, 0x08, self._method, 0, 0x21, crc, written, raw_size, len(name))
        self._central.append(
            struct.pack("<IH", 0x02014B50, 20)
            + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0o600 << 16, offset)
            + name
        )

    def add_array(self, key: str, arr: np.ndarray) -> None:
        """One member from a whole array (small ones: the weighting)."""
        a = np.asarray(arr)
        self.add(key, a.dtype, tuple(a.shape), [a])

    def close(self) -> None:
        """Write the central directory; sets ``digest`` and ``size``."""
        if self._raw.closed:
            return
        cd_offset = self._out.size
        for entry in self._central:
            self._out.write(entry)
        cd_size = self._out.size - cd_offset
        n = len(self._central)
        self._out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, cd_size, cd_offset, 0))
        self._raw.close()
        self.digest = "sha256=" + base64.b64encode(self._out.sha.digest()).decode("ascii")
        self.size = self._out.size


@dataclass(frozen=True)
class NpzMember:
    """One ``.npy`` member of an archive: where its data is and what array it holds."""

    key: str
    method: int
    data_offset: int
    compressed_size: int
    size: int
    crc: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran: bool
    header_len: int


def _inflate(f: BinaryIO, m: NpzMember, where: str) -> Generator[bytes, None, None]:
    """The member's decoded bytes, ``CHUNK_BYTES`` at most at a time; size and CRC checked."""
    f.seek(m.data_offset)
    left = m.compressed_size
    produced = 0
    crc = 0
    inflater = isal_zlib.decompressobj(-15) if m.method == zipfile.ZIP_DEFLATED else None
    try:
        while left > 0 or (inflater is not None and inflater.unconsumed_tail):
            if inflater is not None and inflater.unconsumed_tail:
                data = inflater.unconsumed_tail
            else:
                data = f.read(min(_READ_BYTES, left))
                if not data:
                    raise WeightsFormatError(f"{where}: member {m.key!r} is truncated")
                left -= len(data)
            out = data if inflater is None else inflater.decompress(data, CHUNK_BYTES)
            if not out:
                continue
            produced += len(out)
            if produced > m.size:
                raise WeightsFormatError(f"{where}: member {m.key!r} inflates past its size")
            crc = zlib.crc32(out, crc)
            yield out
        if inflater is not None:
            rest = inflater.flush()
            if rest:
                produced += len(rest)
                crc = zlib.crc32(rest, crc)
                yield rest
    except _INFLATE_ERRORS as exc:
        raise WeightsFormatError(f"{where}: member {m.key!r} is corrupt: {exc}") from exc
    if produced != m.size or crc != m.crc:
        raise WeightsFormatError(f"{where}: member {m.key!r} is corrupt (size or CRC)")


def read_members(f: BinaryIO, where: str) -> dict[str, NpzMember]:
    """Every ``.npy`` member's location and header, by key (``layer_0``, ``weighting``)."""
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error, OSError) as exc:
        raise WeightsFormatError(f"{where}: not a readable .npz archive: {exc}") from exc
    out: dict[str, NpzMember] = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise WeightsFormatError(f"{where}: member {info.filename!r} is not .npy")
        plain = info.compress_type in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
        if info.flag_bits & 1 or not plain:
            raise WeightsFormatError(f"{where}: member {info.filename!r} is not stored/deflated")
        f.seek(info.header_offset)
        local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise WeightsFormatError(f"{where}: member {info.filename!r} has a bad local header")
        name_len, extra_len = struct.unpack_from("<HH", local, 26)
        key = info.filename[: -len(".npy")]
        m = NpzMember(
            key, info.compress_type, info.header_offset + 30 + name_len + extra_len,
            info.compress_size, info.file_size, info.CRC, np.dtype(np.uint8), (), False, 0,
        )  # fmt: skip
        head = bytearray()
        gen = _inflate(f, m, where)
        try:
            for chunk in gen:
                head += chunk
                if len(head) >= 65536 or len(head) >= m.size:
                    break
        except WeightsFormatError as exc:
            if "corrupt (size or CRC)" not in str(exc):
                raise
        finally:
            gen.close()
        buf = io.BytesIO(bytes(head))
        try:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        except (ValueError, EOFError, SyntaxError, TypeError, UnicodeDecodeError) as exc:
            raise WeightsFormatError(f"{where}: member {key!r} has a bad .npy header") from exc
        if dtype.hasobject:
            raise WeightsFormatError(f"{where}: member {key!r} cannot load without pickle")
        hlen = buf.tell()
        shape = tuple(int(d) for d in shape)
        if int(np.prod(shape)) * dtype.itemsize != m.size - hlen:
            raise WeightsFormatError(f"{where}: member {key!r} holds the wrong number of bytes")
        out[key] = NpzMember(
            key, m.method, m.data_offset, m.compressed_size, m.size, m.crc, dtype, shape,
            bool(fortran), hlen,
        )  # fmt: skip
    return out


def iter_member_chunks(f: BinaryIO, member: NpzMember, where: str) -> Iterator[np.ndarray]:
    """The member's values as flat arrays of about ``CHUNK_BYTES``, in storage order.

    Size and CRC are checked as the last chunk comes out: treat the values as untrusted
    until the iterator finishes without raising.
    """
    skip = member.header_len
    carry = b""
    item = member.dtype.itemsize
    for raw in _inflate(f, member, where):
        if skip:
            cut = min(skip, len(raw))
            raw, skip = raw[cut:], skip - cut
        data = carry + raw if carry else raw
        usable = len(data) - len(data) % item if item else 0
        if usable:
            yield np.frombuffer(data, dtype=member.dtype, count=usable // item)
        carry = data[usable:]


def load_layers(path: Path) -> list[np.ndarray]:
    """The ``layer_*`` arrays of an archive, decoded chunk by chunk into their final arrays.

    Costs the arrays themselves plus a chunk, where reading the file whole first costs
    the compressed bytes too.
    """
    where = str(path)
    with open(path, "rb") as f:
        members = read_members(f, where)
        keys = sorted((k for k in members if k.startswith("layer_")), key=lambda k: int(k[6:]))
        if not keys:
            raise WeightsFormatError(f"{where}: archive holds no layer_* arrays")
        out = []
        for key in keys:
            m = members[key]
            flat = np.empty(int(np.prod(m.shape)), dtype=m.dtype)
            lo = 0
            for chunk in iter_member_chunks(f, m, where):
                flat[lo : lo + chunk.size] = chunk
                lo += chunk.size
            out.append(flat.reshape(m.shape, order="F") if m.fortran else flat.reshape(m.shape))
    return out


def return_freed_chunks() -> bool:
    """Make glibc give freed chunk-sized buffers back to the OS at once (issue 17).

    glibc raises its mmap threshold after a large block is freed (up to 32 MiB), so the
    4 MiB chunks of streaming reads then come from per-thread heaps that keep their peak
    size: a process streaming with a few threads held 3-5 chunks' worth per thread long
    after use. A fixed threshold of 1 MiB keeps every buffer of that size mmapped and
    returned on free. Returns False where there is no glibc (the call is then a no-op).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 20))
    except (OSError, AttributeError):
        return False
