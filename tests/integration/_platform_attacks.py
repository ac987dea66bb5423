"""Hostile inputs for the platform-hardening tests and benchmarks/platform_hardening.py:
raw HTTP over a socket, decompression bombs, ZIP flag tampering, RSS sampling."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is and return everything the server answers until it closes."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(data)
        out = bytearray()
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and _complete(bytes(out)):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return bytes(out)


def _complete(resp: bytes) -> bool:
    head, _, body = resp.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def status_of(resp: bytes) -> int:
    line = resp.split(b"\r\n", 1)[0].split()
    assert len(line) >= 2, f"no HTTP answer: {resp[:200]!r}"
    return int(line[1])


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


_Member = tuple[bytes, bytes, int, int]  # name, deflated data, CRC-32, size


def _member(name: str, chunks: list[bytes] | None, zero_bytes: int, tail: bytes) -> _Member:
    """A deflated member: ``chunks`` then ``zero_bytes`` zeros then ``tail``."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    crc, size = 0, 0
    out = bytearray()
    for c in chunks or []:
        out += comp.compress(c)
        crc, size = zlib.crc32(c, crc), size + len(c)
    block = bytes(16 * 2**20)
    left = zero_bytes
    while left:
        piece = block[: min(left, len(block))]
        out += comp.compress(piece)
        crc, size, left = zlib.crc32(piece, crc), size + len(piece), left - len(piece)
    out += comp.compress(tail)
    crc, size = zlib.crc32(tail, crc), size + len(tail)
    out += comp.flush()
    return name.encode(), bytes(out), crc, size


def bomb(decompressed: int, *, dtype: str = "<f4", nan_at_end: bool = False) -> bytes:
    """A weights archive whose layer_0 is ``decompressed`` bytes of zeros (valid: finite
    values), deflated to about 1/1000; ``nan_at_end`` makes its last value NaN."""
    dt = np.dtype(dtype)
    count = decompressed // dt.itemsize
    tail = np.array([np.nan], dt).tobytes() if nan_at_end else b""
    zeros = (count - (1 if nan_at_end else 0)) * dt.itemsize
    members = [
        _member(
            "weighting.npy",
            [_npy_header(np.dtype("<f8"), (1,)), np.array([1.0]).tobytes()],
            0,
            b"",
        ),
        _member("layer_0.npy", [_npy_header(dt, (count,))], zeros, tail),
    ]
    return _zip(members)


def _zip(members: list[_Member]) -> bytes:
    out = io.BytesIO()
    central = []
    for name, data, crc, size in members:
        offset = out.tell()
        fields = (20, 0, zipfile.ZIP_DEFLATED, 0, 0x21, crc, len(data), size, len(name))
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, *fields, 0) + name + data)
        central.append(
            struct.pack("<IH", 0x02014B50, 20)
            + struct.pack("<HHHHHIIIHHHHHII", *fields, 0, 0, 0, 0, 0o600 << 16, offset)
            + name
        )
    cd = out.tell()
    for entry in central:
        out.write(entry)
    n = len(central)
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, out.tell() - cd, cd, 0))
    return out.getvalue()


def set_flag(data: bytes, *, local: bool, central: bool, bit: int = 1) -> bytes:
    """``data`` with general-purpose flag ``bit`` set on every member (local headers,
    central directory entries, or both): bit 1 is 'encrypted'."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    if local:
        for info in infos:
            (flags,) = struct.unpack_from("<H", buf, info.header_offset + 6)
            struct.pack_into("<H", buf, info.header_offset + 6, flags | bit)
    if central:
        at = buf.rfind(b"PK\x05\x06")
        count, _, cd_offset = struct.unpack_from("<HII", buf, at + 10)
        pos = cd_offset
        for _ in range(count):
            (flags,) = struct.unpack_from("<H", buf, pos + 8)
            struct.pack_into("<H", buf, pos + 8, flags | bit)
            n, m, k = struct.unpack_from("<HHH", buf, pos + 28)
            pos += 46 + n + m + k
    return bytes(buf)


def set_method(data: bytes, method: int) -> bytes:
    """``data`` with every member's compression method changed (both headers)."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    for info in infos:
        struct.pack_into("<H", buf, info.header_offset + 8, method)
    at = buf.rfind(b"PK\x05\x06")
    count, _, cd_offset = struct.unpack_from("<HII", buf, at + 10)
    pos = cd_offset
    for _ in range(count):
        struct.pack_into("<H", buf, pos + 10, method)
        n, m, k = struct.unpack_from("<HHH", buf, pos + 28)
        pos += 46 + n + m + k
    return bytes(buf)


class RssSampler:
    """Peak RSS of a process (and its children), sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval
        self.baseline = self._rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        return int(self._proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
            except psutil.Error:
                return
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for_log(path: Path, needle: str, timeout: float = 10.0) -> str:
    """The log's text once it contains ``needle`` (polls the file; fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if needle in text:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} never appeared in {path}")
        time.sleep(0.05)
