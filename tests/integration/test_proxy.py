"""The chaos TCP proxy against a real echo server on loopback: toxics measured."""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from bk_sim.chaos import ToxicProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            self.request.sendall(data)


class _Sink(socketserver.BaseRequestHandler):
    """Reads until EOF, then answers with the byte count (bandwidth test)."""

    def handle(self) -> None:
        n = 0
        while True:
            data = self.request.recv(65536)
            if not data:
                break
            n += len(data)
            if n >= self.server.expect:  # type: ignore[attr-defined]
                break
        self.request.sendall(struct.pack("!Q", n))


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture()
def echo() -> Iterator[tuple[str, int]]:
    srv = _Server(("127.0.0.1", 0), _Echo)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[:2]
    srv.shutdown()
    srv.server_close()


def _rtt(sock: socket.socket, payload: bytes = b"ping") -> float:
    t0 = time.perf_counter()
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "proxy closed the connection"
        got += chunk
    assert got == payload, got
    return time.perf_counter() - t0


def test_latency_is_added_each_way_within_10_percent(echo: tuple[str, int]) -> None:
    with ToxicProxy(*echo) as proxy:
        assert proxy.address is not None
        with socket.create_connection(proxy.address, timeout=5) as s:
            base = min(_rtt(s) for _ in range(5))
            proxy.set_latency(0.15)
            rtts = [_rtt(s) for _ in range(4)]
    # Both directions are delayed: one round trip gains twice the latency.
    for rtt in rtts:
        assert abs((rtt - base) - 0.30) <= 0.03, rtts


def test_jitter_stays_within_its_bound_and_keeps_order(echo: tuple[str, int]) -> None:
    with ToxicProxy(*echo, seed=3) as proxy:
        assert proxy.address is not None
        proxy.set_latency(0.05, jitter_s=0.05)
        with socket.create_connection(proxy.address, timeout=5) as s:
            rtts = [_rtt(s, bytes([i]) * 10) for i in range(8)]
    assert all(0.095 <= r <= 0.23 for r in rtts), rtts
    assert max(rtts) - min(rtts) > 0.005  # the jitter is there


def test_bandwidth_limit_within_10_percent() -> None:
    size = 300_000
    srv = _Server(("127.0.0.1", 0), _Sink)
    srv.expect = size  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with ToxicProxy(*srv.server_address[:2]) as proxy:
            assert proxy.address is not None
            proxy.set_bandwidth(200_000)  # bytes/s: 300 kB take 1.5 s
            with socket.create_connection(proxy.address, timeout=10) as s:
                t0 = time.perf_counter()
                s.sendall(b"x" * size)
                got = s.recv(8)
                elapsed = time.perf_counter() - t0
    finally:
        srv.shutdown()
        srv.server_close()
    assert struct.unpack("!Q", got)[0] == size
    rate = size / elapsed
    assert abs(rate - 200_000) <= 20_000, f"{rate:.0f} B/s over {elapsed:.2f} s"


def test_blackhole_stalls_without_closing_then_drops_corrupt_streams(
    echo: tuple[str, int],
) -> None:
    with ToxicProxy(*echo) as proxy:
        assert proxy.address is not None
        with (
            socket.create_connection(proxy.address, timeout=5) as s,
            socket.create_connection(proxy.address, timeout=5) as idle,
        ):
            _rtt(s)
            proxy.set_blackhole(True)
            s.sendall(b"lost")
            s.settimeout(0.6)
            with pytest.raises(TimeoutError):
                s.recv(10)  # nothing comes back, and the socket is not closed either
            # A connection made during the stall is accepted and stalls too.
            with socket.create_connection(proxy.address, timeout=5) as late:
                late.sendall(b"x")
                late.settimeout(0.3)
                with pytest.raises(TimeoutError):
                    late.recv(10)
            assert proxy.bytes_swallowed >= 4
            proxy.set_blackhole(False)
            s.settimeout(3)
            assert s.recv(10) == b""  # its stream lost bytes: closed when the stall ends
            idle.settimeout(3)
            _rtt(idle)  # an idle connection lost nothing and keeps working (echo checked)


def test_reset_all_sends_rst(echo: tuple[str, int]) -> None:
    with ToxicProxy(*echo) as proxy:
        assert proxy.address is not None
        with socket.create_connection(proxy.address, timeout=5) as s:
            _rtt(s)
            assert proxy.reset_all() == 1
            s.settimeout(3)
            with pytest.raises(ConnectionResetError):
                s.recv(10)
                s.sendall(b"x")
                s.recv(10)


def test_slow_close_delays_the_other_side(echo: tuple[str, int]) -> None:
    with ToxicProxy(*echo) as proxy:
        assert proxy.address is not None
        proxy.set_slow_close(0.5)
        with socket.create_connection(proxy.address, timeout=5) as s:
            _rtt(s)
            t0 = time.perf_counter()
            s.shutdown(socket.SHUT_WR)
            s.settimeout(3)
            assert s.recv(10) == b""
            waited = time.perf_counter() - t0
    assert 0.45 <= waited <= 0.8, waited


def test_upstream_refused_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    with ToxicProxy("127.0.0.1", dead_port) as proxy:
        assert proxy.address is not None
        # The client's connection is reset: at connect, or at its first read.
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(proxy.address, timeout=5) as s:
                s.settimeout(3)
                s.recv(10)
