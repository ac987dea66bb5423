"""Time bk-sim's own RabbitMQ node: start, graceful stop, restart (``--runs`` nodes).

    python tools/broker_timing.py --runs 3 --restarts 2

Start = process spawned until AMQP and the management API both answer; a restart is a
graceful stop (SIGTERM to the VM; RabbitMQ stops its management plugin first) plus a
start on the same ports and data; remove = stop + directory deleted.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bk_sim.broker import provide_broker, restart_broker


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=2)
    args = ap.parse_args()
    starts, stops, restarts, removes = [], [], [], []
    for _ in range(args.runs):
        t0 = time.monotonic()
        with provide_broker("process") as endpoints:
            node = endpoints._node
            assert node is not None
            for _ in range(args.restarts):
                t1 = time.monotonic()
                restart_broker(endpoints)
                restarts.append(time.monotonic() - t1)
            starts.append(node.start_times[0])
            stops += node.stop_times
            t2 = time.monotonic()
        removes.append(time.monotonic() - t2)
        _ = t0
    for name, values in (
        ("start (until AMQP + management answer)", starts),
        ("graceful stop", stops),
        ("restart (stop + start, data kept)", restarts),
        ("stop + remove at the end", removes),
    ):
        print(
            f"{name:42s} n={len(values)}  median {statistics.median(values):5.1f} s  "
            f"min {min(values):5.1f} s  max {max(values):5.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
