"""Measure the platform under the attacks of issue 16 (loopback only, bounded in time).

    python benchmarks/platform_hardening.py bombs [--count 8] [--inflate 1900000000]
    python benchmarks/platform_hardening.py bombs --count 8 --stored-mib 64
    python benchmarks/platform_hardening.py slowloris [--connections 2000] [--seconds 60]

``bombs``: a platform (no broker) with default limits; ``count`` leaves of a branch with
``count + 1`` leaves (so the round stays open: this measures receiving and validating,
not aggregating) upload at once a 1.8 MB archive that inflates to ``inflate`` bytes of
valid zeros. The platform's RSS is sampled every 10 ms with psutil.

``slowloris``: ``connections`` connections each send a request line and then one header
line a second, never ending the headers, and reconnect when closed, for ``seconds``;
meanwhile ``/healthz`` is fetched on a fresh connection every 250 ms. Reports each
slowloris connection's lifetime (must not exceed the header timeout plus the watchdog's
tick) and the health latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bk_sim.platform import Limits, start_platform  # noqa: E402
from bk_sim.weights import encode_weights  # noqa: E402
from tests.integration._platform_attacks import RssSampler, address, bomb  # noqa: E402
from tests.integration._platform_support import make_branch, post_upload  # noqa: E402

MiB = 2**20


def bombs(count: int, inflate: int, stored_mib: int = 0) -> dict[str, object]:
    """``stored_mib``: upload that many MiB of random float32 (stored, incompressible)
    instead of a bomb: request bodies that are large on the wire."""
    if stored_mib:
        values = np.random.default_rng(0).random(stored_mib * MiB // 4, dtype=np.float32)
        data = encode_weights(1.0, [values], compression="stored")
    else:
        data = bomb(inflate)
    with tempfile.TemporaryDirectory() as tmp:
        handle = start_platform(tmp, no_amqp=True)
        try:
            assert handle.pid is not None
            with make_branch(handle, count + 1) as b:
                with RssSampler(handle.pid, interval=0.01) as rss, ThreadPoolExecutor(count) as p:
                    start = time.monotonic()
                    codes = list(
                        p.map(
                            lambda i: post_upload(b.url, b.leaves[i], data, timeout=600),
                            range(count),
                        )
                    )
                    took = time.monotonic() - start
        finally:
            handle.stop()
    return {
        "bombs": count,
        "archive_bytes": len(data),
        "inflates_to_bytes": inflate if not stored_mib else len(data),
        "statuses": sorted({r.status_code for r in codes}),
        "seconds": round(took, 1),
        "rss_baseline_mib": round(rss.baseline / MiB, 1),
        "rss_peak_mib": round(rss.peak / MiB, 1),
        "rss_growth_mib": round((rss.peak - rss.baseline) / MiB, 1),
    }


async def _slowloris(host: str, port: int, until: float, lifetimes: list[float]) -> None:
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        opened = time.monotonic()
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            while time.monotonic() < until:
                try:
                    if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                        break  # closed by the server
                except asyncio.TimeoutError:
                    writer.write(b"X-Slow: 1\r\n")
                    await writer.drain()
            else:
                return  # the run ended with this connection still open
        except (ConnectionError, OSError):
            pass
        lifetimes.append(time.monotonic() - opened)
        writer.close()


def _health(host: str, port: int, until: float, latencies: list[float]) -> None:
    """Blocking GET /healthz on a fresh connection every 250 ms, from this process (the
    attacker runs in another one: its event-loop lag is not measured)."""
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            with socket.create_connection((host, port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(4096):
                    answer += chunk
            ok = answer.startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        latencies.append(time.perf_counter() - start if ok else float("inf"))
        time.sleep(0.25)


def _attack(host: str, port: int, connections: int, seconds: float, out: Any) -> None:
    lifetimes: list[float] = []

    async def run() -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(_slowloris(host, port, until, lifetimes) for _ in range(connections))
        )

    asyncio.run(run())
    out.put(lifetimes)


def slowloris(connections: int, seconds: float) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections * 2 + 256)), hard))
    limits = Limits()
    with tempfile.TemporaryDirectory() as tmp:
        handle = start_platform(tmp, no_amqp=True)
        try:
            assert handle.pid is not None
            host, port = address(handle.url)
            latencies: list[float] = []
            results: Any = multiprocessing.Queue()
            attacker = multiprocessing.Process(
                target=_attack, args=(host, port, connections, seconds, results)
            )
            with RssSampler(handle.pid, interval=0.1) as rss:
                attacker.start()
                time.sleep(1.0)  # let the connections open first
                _health(host, port, time.monotonic() + seconds - 1.0, latencies)
                lifetimes: list[float] = results.get(timeout=seconds + 60)
                attacker.join(30)
            server = handle.admin.limits_stats()["connections"]
        finally:
            handle.stop()
    ok = sorted(x for x in latencies if x != float("inf"))
    return {
        "connections": connections,
        "seconds": seconds,
        "header_timeout_s": limits.header_timeout_s,
        "server_closed": server["closed"],
        "server_longest_header_wait_s": server["longest_s"].get("header_timeout"),
        "client_seen_closed": len(lifetimes),
        "client_lifetime_max_s": round(max(lifetimes), 2) if lifetimes else None,
        "client_lifetime_median_s": round(statistics.median(lifetimes), 2) if lifetimes else None,
        "health_requests": len(latencies),
        "health_failed": len(latencies) - len(ok),
        "health_p50_ms": round(statistics.median(ok) * 1000, 1) if ok else None,
        "health_p99_ms": round(ok[max(0, int(len(ok) * 0.99) - 1)] * 1000, 1) if ok else None,
        "health_max_ms": round(max(ok) * 1000, 1) if ok else None,
        "rss_peak_mib": round(rss.peak / MiB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bombs")
    b.add_argument("--count", type=int, default=8)
    b.add_argument("--inflate", type=int, default=1_900_000_000)
    b.add_argument("--stored-mib", type=int, default=0, help="random float32 uploads instead")
    s = sub.add_parser("slowloris")
    s.add_argument("--connections", type=int, default=2000)
    s.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    if args.what == "bombs":
        result = bombs(args.count, args.inflate, args.stored_mib)
    else:
        result = slowloris(args.connections, args.seconds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
