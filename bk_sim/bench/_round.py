"""``bk-sim bench round``: a real round's wall time against the CPU floor of its parts.

One invocation measures both on this machine:

1. **The floor.** Each part of a round of ``leaves.count`` leaves, on one thread, for
   every leaf: generate (``leaf_update``), compress (``encode_weights``), hash (the
   client's SHA-256 and the platform's), the platform's checks (``validate_stored`` of
   the stored file), aggregate (the platform's ``aggregate`` over the N stored files),
   notify (N persistent publishes and N deliveries through the real broker), download
   (the aggregate's bytes over a loopback socket, once per leaf) and decode (the
   aggregate, once per leaf process: leaves of a process share it). The floor is the
   per-leaf parts spread over every core plus the aggregate (which already reads on
   every core): what a round could take if nothing but its work ran, perfectly parallel.
2. **The real round.** The scenario run by ``bk-sim run`` with two rounds and no start
   jitter; the second round's wall time (first upload begun to last download) is the
   figure, so process start-up and connecting are not in it. Its event log gives the
   phases (uploads, aggregation and notification, downloads), which say where the time
   beyond the floor goes.

``ratio`` = wall / floor. Figures only: nothing here is enforced by a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pika

from bk_sim import weights
from bk_sim.broker import provide_broker
from bk_sim.engine import read_events
from bk_sim.platform import DEFAULT_MAX_DECOMPRESSED_BYTES, Upload, aggregate, validate_stored
from bk_sim.scenario import Scenario
from bk_sim.synth import leaf_update, leaf_weightings

#: Target from issue 14.
RATIO_TARGET = 1.5
PER_LEAF_PARTS = ("generate", "compress", "hash", "check", "download")


@dataclass
class RoundBench:
    """Both measurements and their ratio; ``to_dict`` is the ``--json`` document."""

    leaves: int
    cores: int
    processes: int
    model_bytes: int
    parts_s: dict[str, float] = field(default_factory=dict)
    floor_s: float = 0.0
    wall_s: float | None = None
    phases_s: dict[str, float] = field(default_factory=dict)
    client_check_s: float = 0.0
    run_dir: str | None = None
    run_passed: bool | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.wall_s is None or self.floor_s <= 0 else self.wall_s / self.floor_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaves": self.leaves,
            "cores": self.cores,
            "processes": self.processes,
            "upload_bytes": self.model_bytes,
            "parts_s": self.parts_s,
            "floor_s": self.floor_s,
            "wall_s": self.wall_s,
            "ratio": self.ratio,
            "target": RATIO_TARGET,
            "phases_s": self.phases_s,
            "client_check_s": self.client_check_s,
            "run_dir": self.run_dir,
            "run_passed": self.run_passed,
        }

    def lines(self) -> list[str]:
        out = [
            f"round of {self.leaves} leaves, {self.model_bytes / 1e6:.1f} MB uploads, "
            f"{self.cores} cores, {self.processes} leaf processes",
            "floor (CPU of the parts, one thread):",
        ]
        out += [f"  {k:<10} {v:8.3f} s" for k, v in self.parts_s.items()]
        out.append(f"  floor      {self.floor_s:8.3f} s  (per-leaf parts / cores + aggregate)")
        out.append(
            f"  (not in the floor) client-side archive check: {self.client_check_s:.3f} s CPU"
        )
        if self.wall_s is None:
            out.append("real round: did not finish")
            return out
        out.append(f"real round: {self.wall_s:.3f} s wall (run {self.run_dir})")
        out += [f"  {k:<28} {v:8.3f} s" for k, v in self.phases_s.items()]
        ratio = self.ratio
        met = ratio is not None and ratio <= RATIO_TARGET
        out.append(
            f"ratio wall / floor: {ratio:.2f}x (target <= {RATIO_TARGET}x: "
            f"{'met' if met else 'NOT met'})"
        )
        return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def measure_floor(scenario: Scenario, workdir: Path, processes: int) -> RoundBench:
    """The CPU of each part of one round, one thread, in this process."""
    n = scenario.leaves.count
    model = scenario.model
    comp = scenario.payload.compression
    ws = leaf_weightings(scenario.seed, scenario.leaves.weighting, n)
    base = leaf_update(scenario.seed, 0, 1, None, model)
    parts = dict.fromkeys(("generate", "compress", "hash", "check"), 0.0)
    client_check = 0.0
    uploads: list[Upload] = []
    size = 0
    for i in range(n):
        t0 = time.thread_time()
        layers = leaf_update(scenario.seed, i, 2, base, model)
        t1 = time.thread_time()
        data = weights.encode_weights(float(ws[i]), layers, compression=comp)
        t2 = time.thread_time()
        hashlib.sha256(data).digest()  # the client's x-bk-file-digest
        hashlib.sha256(data).digest()  # the platform's, of what arrived
        t3 = time.thread_time()
        path = workdir / f"u{i}.npz"
        path.write_bytes(data)
        t4 = time.thread_time()
        validate_stored(path, DEFAULT_MAX_DECOMPRESSED_BYTES)
        t5 = time.thread_time()
        weights.validate_weights(data)  # what the client checks before it uploads
        t6 = time.thread_time()
        parts["generate"] += t1 - t0
        parts["compress"] += t2 - t1
        parts["hash"] += t3 - t2
        parts["check"] += t5 - t4
        client_check += t6 - t5
        size = len(data)
        uploads.append(Upload(f"leaf{i}", path, float(ws[i])))
        del layers, data
    t0 = time.perf_counter()  # wall: aggregate reads on several threads
    agg = aggregate(uploads, scenario.platform.strategy)
    parts["aggregate"] = time.perf_counter() - t0
    blob = weights.encode_layers(agg, compression=comp)
    agg_path = workdir / "aggregate.npz"
    agg_path.write_bytes(blob)
    parts["notify"] = _notify_cost(scenario, n)
    parts["download"] = _loopback_cost(blob, n)
    parts["decode"] = processes * _timed(lambda: weights.read_layers(agg_path))
    cores = os.cpu_count() or 1
    per_leaf = sum(parts[k] for k in PER_LEAF_PARTS)
    floor = per_leaf / cores + parts["aggregate"] + (parts["notify"] + parts["decode"]) / cores
    return RoundBench(
        leaves=n,
        cores=cores,
        processes=processes,
        model_bytes=size,
        parts_s=parts,
        floor_s=floor,
        client_check_s=client_check,
    )


def _notify_cost(scenario: Scenario, n: int) -> float:
    """N persistent, confirmed publishes and their N deliveries through the real broker
    (wall time: the broker's work is part of it)."""
    b = scenario.broker
    with provide_broker(
        b.provider, amqp_url=b.amqp_url, management_url=b.management_url
    ) as endpoints:
        url = endpoints.amqp_url
        if not url:
            return 0.0
        conn = pika.BlockingConnection(pika.URLParameters(url))
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            q = ch.queue_declare("", exclusive=True).method.queue
            props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
            body = json.dumps({"message_type": "aggregation_status", "value": "x" * 36}).encode()
            t0 = time.perf_counter()
            for _ in range(n):
                ch.basic_publish("", q, body, properties=props)
            got = 0
            for _method, _props, _body in ch.consume(q, auto_ack=True, inactivity_timeout=5):
                if _method is None:
                    break
                got += 1
                if got == n:
                    break
            spent = time.perf_counter() - t0
            ch.cancel()
            return spent
        finally:
            conn.close()


def _loopback_cost(blob: bytes, n: int) -> float:
    """The aggregate's bytes sent N times over a loopback TCP socket (wall)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    total = len(blob) * n

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            left = total
            buf = bytearray(1 << 20)
            while left > 0:
                got = conn.recv_into(buf)
                if not got:
                    break
                left -= got

    t = threading.Thread(target=sink, daemon=True)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            c.sendall(blob)
        t.join()
        spent = time.perf_counter() - t0
    server.close()
    return spent


def round_phases(run_dir: Path, round_index: int) -> tuple[float | None, dict[str, float]]:
    """The round's wall time and its phases, from the run's event log."""
    begun: list[float] = []
    uploaded: list[float] = []
    notified: list[float] = []
    downloaded: list[float] = []
    for e in read_events(run_dir / "events.jsonl"):
        if e.get("round") != round_index:
            continue
        kind = e.get("kind")
        if kind == "upload":
            begun.append(float(e.get("begun", e["t"])))
            uploaded.append(float(e["t"]))
        elif kind == "aggregate_notified":
            notified.append(float(e["t"]))
        elif kind == "download":
            downloaded.append(float(e["t"]))
    if not (begun and uploaded and notified and downloaded):
        return None, {}
    t0 = min(begun)
    phases = {
        "first upload begun -> last upload answered": max(uploaded) - t0,
        "last upload -> first notification": min(notified) - max(uploaded),
        "first -> last notification": max(notified) - min(notified),
        "last notification -> last download": max(downloaded) - max(notified),
    }
    return max(downloaded) - t0, phases


def bench_round(scenario: Scenario, *, keep_run: bool = False) -> RoundBench:
    """The floor, then the real round (two rounds, no jitter; the second is measured)."""
    from bk_sim.sim import SimulationRun  # the workload: imported when used

    sc = replace(scenario, rounds=2, leaves=replace(scenario.leaves, start_jitter_s=0.0))
    processes = sc.leaves.processes or min(sc.leaves.count, (os.cpu_count() or 1) * 2)
    work = Path(tempfile.mkdtemp(prefix="bk-sim-bench-round-"))
    try:
        result = measure_floor(sc, work, processes)
        for f in work.iterdir():
            f.unlink()
        run_dir = work / "run"
        run = SimulationRun(sc, run_dir=run_dir, progress=lambda _line: None).execute()
        wall, phases = round_phases(run_dir, 2)
        result = replace(result, wall_s=wall, phases_s=phases, run_passed=run.exit_code == 0)
        if keep_run:
            kept = Path(tempfile.mkdtemp(prefix="bk-sim-bench-round-run-"))
            shutil.move(str(run_dir), kept / "run")
            result.run_dir = str(kept / "run")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
