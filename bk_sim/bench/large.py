"""Large-model figures (issue 17): one big upload leaf -> platform, and the validator.

    python -m bk_sim.bench.large upload [--params 100000000] [--repeat 3]
    python -m bk_sim.bench.large judge RUN_DIR SCENARIO_FILE

``upload`` starts a local platform (no broker), writes one upload of ``--params`` float32
values with the leaves' streaming writer, and times ``Client.file_upload`` (hash, check,
send, the platform's receive + validate + store, its 201), reporting MB/s and the
client's and the platform's RSS growth. ``judge`` re-judges a finished run folder (its
events and downloaded aggregates) and reports each round's validation time, MB/s of
upload data and the judging process's RSS growth.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bk_sim import npzstream
from bk_sim.client import Client
from bk_sim.engine import judge, read_events
from bk_sim.platform import start_platform
from bk_sim.scenario import load_scenario


class _Peak:
    """Peak RSS of some processes, sampled every 20 ms in a thread."""

    def __init__(self, *pids: int) -> None:
        self._procs = [psutil.Process(p) for p in pids]
        self.rest = [p.memory_info().rss for p in self._procs]
        self.peak = list(self.rest)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            for i, p in enumerate(self._procs):
                self.peak[i] = max(self.peak[i], p.memory_info().rss)

    def stop(self) -> list[float]:
        """Growth over rest of each process, MiB."""
        self._stop.set()
        self._thread.join()
        return [(pk - r) / 2**20 for pk, r in zip(self.peak, self.rest, strict=True)]


def _cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process and its threads (0 without a pid)."""
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _upload(params: int, repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bk-sim-large-bench-"))
    npzstream.return_freed_chunks()
    handle = start_platform(tmp / "platform", no_amqp=True, max_upload_bytes=8 * params + 2**20)
    try:
        admin = handle.admin
        tree = admin.create_tree("bench-large")
        branch = admin.create_branch(tree, "b", quorum=1, round_timeout_s=3600)["branch_id"]
        creds = admin.create_leaves(branch, 2)
        admin.set_run_status(branch, "start")
        path = tmp / "upload.npz"
        rng = np.random.default_rng(0)
        t = time.perf_counter()
        with npzstream.NpzWriter(path, "fast") as w:
            w.add_array("weighting", np.array([1.0]))
            step = 2**20
            chunks = (rng.random(min(step, params - lo), dtype=np.float32)
                      for lo in range(0, params, step))  # fmt: skip
            w.add("layer_0", np.dtype(np.float32), (params,), chunks)
        mb = path.stat().st_size / 1e6
        print(f"wrote {mb:.0f} MB ({params:,} float32) in {time.perf_counter() - t:.2f} s")
        plat_pid = handle.pid
        with Client(creds[0], host=handle.url, ssl=False, notifications=False) as client:
            for i in range(repeat):
                peak = _Peak(psutil.Process().pid, *([plat_pid] if plat_pid else []))
                cpu0 = _cpu(psutil.Process().pid), _cpu(plat_pid)
                t0 = time.perf_counter()
                client.file_upload(path)
                dt = time.perf_counter() - t0
                cpu = _cpu(psutil.Process().pid) - cpu0[0], _cpu(plat_pid) - cpu0[1]
                growth = peak.stop()
                print(
                    f"upload {i + 1}: {dt:.2f} s, {mb / dt:.0f} MB/s; CPU client {cpu[0]:.2f} s, "
                    f"platform {cpu[1]:.2f} s; load average {os.getloadavg()[0]:.1f}; RSS "
                    f"growth client {growth[0]:.0f} MiB"
                    + (f", platform {growth[1]:.0f} MiB" if plat_pid else "")
                )
        admin.delete_tree(tree)
    finally:
        handle.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _judge(run_dir: Path, scenario_file: Path) -> None:
    npzstream.return_freed_chunks()
    scenario = load_scenario(scenario_file)
    events = list(read_events(run_dir / "events.jsonl"))
    peak = _Peak(psutil.Process().pid)
    t0, c0 = time.perf_counter(), _cpu(os.getpid())
    j = judge(scenario, events, None, run_dir / "aggregates")
    total, cpu = time.perf_counter() - t0, _cpu(os.getpid()) - c0
    growth = peak.stop()[0]
    for r in j.rounds:
        print(
            f"round {r.round}: passed {r.passed}, validation {r.validation_s:.2f} s, "
            f"{r.validator_mb_s or 0:.0f} MB/s of upload data"
        )
    s = scenario.model.nbytes
    mb = sum(float(e.get("bytes", 0)) for e in events if e.get("kind") == "upload") / 1e6
    print(
        f"total {total:.2f} s ({mb / total:.0f} MB/s), CPU {cpu:.2f} s ({mb / cpu:.0f} MB/s of "
        f"CPU), load average {os.getloadavg()[0]:.1f}; judging RSS growth {growth:.0f} MiB = "
        f"{growth * 2**20 / s:.2f} x S"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="what", required=True)
    up = sub.add_parser("upload")
    up.add_argument("--params", type=int, default=100_000_000)
    up.add_argument("--repeat", type=int, default=3)
    jd = sub.add_parser("judge")
    jd.add_argument("run_dir", type=Path)
    jd.add_argument("scenario", type=Path, help="the scenario file the run played")
    args = parser.parse_args(argv)
    if args.what == "upload":
        _upload(args.params, args.repeat)
    else:
        _judge(args.run_dir, args.scenario)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
