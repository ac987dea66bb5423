"""How much upload load one generator core makes: our ``LeafUser`` beside ``FastHttpUser``.

Run: ``python -m bk_sim.bench.load [--seconds 5] [--users 8] [--json out.json]``

One process (one core: gevent is single-threaded) drives uploads to the reference
platform (started here, its own process) for ``--seconds`` per phase, in the same run:

* ``leaf_user``: ``bk_sim.load`` users (the faithful client: read the file, validate it,
  SHA-256, multipart, one request per upload; every attempt through the observer into
  Locust's stats), upload task only, no waits, notifications off;
* ``fast_http``: Locust's ``FastHttpUser`` POSTing the same multipart body with the same
  headers to the same endpoint, as leaves of the same branch.

For small (10 kB) and large (4 MB) payloads it prints uploads per second, MB/s and the
generator's CPU share (process CPU time / wall time: near 100 % means the generator was
the limit, lower means the platform was).
"""

import locust  # noqa: F401, I001 - first: gevent monkey-patches on this import

import argparse
import json
import logging
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent
import psutil
import urllib3
from locust import FastHttpUser, constant, task
from locust.env import Environment

from bk_sim import weights
from bk_sim.load import LoadContext, build_payloads, user_class
from bk_sim.platform import start_platform
from bk_sim.scenario import scenario_from_dict

_log = logging.getLogger("bk_sim.bench.load")

SIZES = {"small_10kB": 2_560, "large_4MB": 1_048_576}  # float32 elements


def _scenario(elements: int, users: int, seconds: float) -> Any:
    return scenario_from_dict(
        {
            "name": "bench_load",
            "leaves": {"count": users},
            "model": {"layers": [{"shape": [elements], "dtype": "float32"}]},
            "payload": {"compression": "fast"},
            "client": {"retry": {"max_retries": 0, "total_timeout": 60}},
            "load": {
                "users": users,
                "spawn_rate": users,
                "duration_s": seconds,
                "wait_min_s": 0,
                "wait_max_s": 0,
                "tasks": {"upload": 1, "download": 0, "metrics": 0, "branch_config": 0},
                "notifications": False,
                "payload_variants": 1,
            },
        }
    )


def _fast_user(url: str, creds: list[dict[str, str]], data: bytes) -> type[FastHttpUser]:
    """FastHttpUsers that POST the exact upload our client sends, one leaf each."""
    digest = weights.digest_header(data)
    meta = json.dumps({"client_version": "bench", "file_size": len(data), "file_digest": digest})
    form = json.dumps({"leaf_name": "bench", "metadata": meta})
    body, content_type = urllib3.encode_multipart_formdata(
        [("data", form), ("file", ("payload.npz", data, "application/octet-stream"))]
    )
    pool = list(creds)

    class RawUpload(FastHttpUser):
        host = url
        wait_time = constant(0)
        network_timeout = 60.0
        connection_timeout = 60.0

        def on_start(self) -> None:
            leaf = pool.pop()
            self.headers = {
                "Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}",
                "accept": "application/json",
                "LEAF": "true",
                "Content-Type": content_type,
                "x-bk-file-size": str(len(data)),
                "x-bk-file-digest": digest,
            }

        @task
        def upload(self) -> None:
            # FastHttpSession sends bytes as they are; its stub names only str and dict.
            self.client.post("/api/v1/file/upload", data=body, headers=self.headers,  # type: ignore[arg-type]
                             name="upload")  # fmt: skip

    return RawUpload


def _phase(env: Environment, users: int, seconds: float, platform: Any) -> dict[str, Any]:
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users * 10)
    gevent.sleep(1.0)  # ramp-up and client construction are not measured
    env.runner.stats.reset_all()  # type: ignore[union-attr]
    cpu0, t0 = time.process_time(), time.perf_counter()
    pcpu0 = _cpu(platform)
    gevent.sleep(seconds)
    entry = env.runner.stats.get("upload", "POST")  # type: ignore[union-attr]
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    pcpu = _cpu(platform) - pcpu0
    count, failures = entry.num_requests, entry.num_failures
    p50 = entry.get_response_time_percentile(0.5) if count else None
    runner.quit()
    return {
        "uploads": count,
        "failures": failures,
        "wall_s": wall,
        "uploads_per_s": count / wall,
        "generator_cpu_share": cpu / wall,
        "platform_cpu_share": pcpu / wall,
        # CPU the generator spends per upload, and what one saturated core could send.
        "generator_cpu_ms_per_upload": 1e3 * cpu / count if count else None,
        "uploads_per_s_per_core": count / cpu if cpu > 0 else None,
        "p50_ms": p50,
    }


def _cpu(proc: Any) -> float:
    """CPU seconds of the platform process and its children so far."""
    t = proc.cpu_times()
    return float(t.user + t.system + t.children_user + t.children_system)


def run(seconds: float, users: int) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": seconds, "users": users, "results": {}}
    with tempfile.TemporaryDirectory(prefix="bk-sim-bench-load-") as tmp:
        handle = start_platform(Path(tmp) / "platform", no_amqp=True,
                                admin_token=secrets.token_urlsafe(24))  # fmt: skip
        try:
            admin = handle.admin
            tree = admin.create_tree("bench-load")
            for label, elements in SIZES.items():
                sc = _scenario(elements, users, seconds)
                branch = admin.create_branch(tree, label, quorum=1, round_timeout_s=1.0)
                creds = admin.create_leaves(branch["branch_id"], 2 * users)
                admin.set_run_status(branch["branch_id"], "start")
                payloads = build_payloads(sc, Path(tmp) / label)
                data = payloads.paths[0].read_bytes()
                ctx = LoadContext(sc, Path(tmp) / f"{label}-dl")
                ctx.payloads = payloads
                ctx.configure(api_url=handle.url, credentials=creds[:users], transport="amqp",
                              amqp_host=None, amqp_port=None)  # fmt: skip
                proc = psutil.Process(handle.pid)
                ours = _phase(Environment(user_classes=[user_class(ctx)]), users, seconds, proc)
                ctx.close_all()
                raw_cls = _fast_user(handle.url, creds[users:], data)
                raw = _phase(Environment(user_classes=[raw_cls]), users, seconds, proc)
                for r in (ours, raw):
                    r["MB_per_s"] = r["uploads_per_s"] * len(data) / 1e6
                out["results"][label] = {
                    "payload_bytes": len(data),
                    "leaf_user": ours,
                    "fast_http": raw,
                    "ratio_fast_over_ours": raw["uploads_per_s"] / max(ours["uploads_per_s"], 1e-9),
                }
            admin.delete_tree(tree)
        finally:
            handle.stop()
    out["cpus"] = os.cpu_count()
    return out


def _print(result: dict[str, Any]) -> None:
    print(
        f"{'payload':<12} {'user':<10} {'uploads/s':>10} {'MB/s':>8} {'gen CPU':>8} "
        f"{'plat CPU':>8} {'p50 ms':>7} {'failed':>6} {'CPU ms/up':>9} {'/s per core':>11}"
    )
    for label, r in result["results"].items():
        for who in ("leaf_user", "fast_http"):
            x = r[who]
            print(
                f"{label:<12} {who:<10} {x['uploads_per_s']:>10.1f} {x['MB_per_s']:>8.1f} "
                f"{x['generator_cpu_share']:>7.0%} {x['platform_cpu_share']:>8.0%} "
                f"{x['p50_ms'] or 0:>7.0f} {x['failures']:>6} "
                f"{x['generator_cpu_ms_per_upload'] or 0:>9.2f} "
                f"{x['uploads_per_s_per_core'] or 0:>11.0f}"
            )
        print(f"{label:<12} FastHttpUser / LeafUser uploads/s = {r['ratio_fast_over_ours']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bk_sim.bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per phase")
    parser.add_argument("--users", type=int, default=8, help="users per phase")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = run(args.seconds, args.users)
    _print(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
