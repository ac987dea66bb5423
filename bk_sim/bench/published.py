"""Env build and round times of a published client through the runner, on loopback.

    python -m bk_sim.bench.published branchkey==2.9.0 amqp 2
    python -m bk_sim.bench.published branchkey==3.0.1 websocket 20

Starts the reference platform (AMQP on 127.0.0.1:5672 unless the transport is
websocket), one runner hosting N leaves, and plays 3 rounds of one 256x256 float32
layer per leaf. Prints one line per figure. Bounded: 3 rounds, loopback only.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from bk_sim.platform import start_platform
from bk_sim.published import LeafSettings, PublishedLeafProcess, prepare
from bk_sim.weights import save_weights

ROUNDS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("requirement")
    parser.add_argument("transport", choices=("amqp", "websocket"))
    parser.add_argument("leaves", type=int, nargs="?", default=2)
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bk-sim-published-bench-"))
    started = time.monotonic()
    env = prepare(args.requirement)
    print(
        f"{env.implementation}: env ready in {time.monotonic() - started:.2f} s "
        f"(built in {env.build_seconds:.1f} s at {env.created_at})"
    )
    handle = start_platform(
        tmp / "platform", amqp_url=args.amqp_url, no_amqp=args.transport == "websocket"
    )
    try:
        admin = handle.admin
        tree = admin.create_tree(f"bench-{uuid.uuid4().hex[:8]}")
        branch = admin.create_branch(tree, "b")["branch_id"]
        creds = admin.create_leaves(branch, args.leaves)
        admin.set_run_status(branch, "start")
        settings = LeafSettings.for_broker(handle.url, args.amqp_url, transport=args.transport)
        rng = np.random.default_rng(0)
        t0 = time.monotonic()
        with PublishedLeafProcess(env, tmp / "runner") as runner:
            ready_s = time.monotonic() - t0
            t1 = time.monotonic()
            ids = [
                runner.send("start_leaf", leaf=f"L{i}", credentials=c, **settings.to_command())
                for i, c in enumerate(creds)
            ]
            failed = [r.error for r in (runner.wait_reply(i, 120) for i in ids) if not r.ok]
            if failed:
                raise SystemExit(f"start_leaf failed: {failed[0]}")
            print(
                f"{env.implementation} {args.transport}: runner ready {ready_s:.2f} s, "
                f"{args.leaves} clients built {time.monotonic() - t1:.2f} s"
            )
            for number in range(1, ROUNDS + 1):
                paths = [
                    save_weights(
                        tmp / f"w{i}-{number}.npz",
                        1.0 + i,
                        [rng.standard_normal((256, 256)).astype(np.float32)],
                    )
                    for i in range(args.leaves)
                ]
                t2 = time.monotonic()
                ids = [runner.send_round(f"L{i}", p, 60) for i, p in enumerate(paths)]
                replies = [runner.wait_reply(i, 180) for i in ids]
                bad = [r.error for r in replies if not r.ok]
                if bad:
                    raise SystemExit(f"round {number} failed: {bad[0]}")
                print(
                    f"{env.implementation} {args.transport} {args.leaves} leaves: "
                    f"round {number} {time.monotonic() - t2:.2f} s"
                )
        admin.delete_tree(tree)
    finally:
        handle.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
