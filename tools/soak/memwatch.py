"""Run a command and sample the memory (RSS) of the harness, the platform and the broker.

    python tools/soak/memwatch.py --out DIR [--every 5] -- bk-sim chaos scenarios/soak.yaml

Every ``--every`` seconds it records the resident memory of: the harness (the command's
own process), its leaf processes (summed), the reference platform (``platform serve``)
and bk-sim's own broker node (the Erlang VM under ``/tmp/bk-sim-rabbit-*``). At the end
it writes ``DIR/memory.csv``, ``DIR/memory.png`` and ``DIR/memory.json`` with, per part,
the slope in MB per hour. Platform and broker are restarted by the soak's faults, so a
slope is fitted within each process lifetime (one intercept per pid, a common slope):
a leak shows as a positive slope even though restarts reset the memory. The first
``--warmup`` seconds are left out of the fit. Exit code: the command's.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil

PARTS = ("harness", "leaves", "platform", "broker")
#: Samples of a process's first seconds are left out of its slope (imports, warm-up).
WARMUP_PER_PROCESS_S = 15.0


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _tree_mb(proc: psutil.Process) -> float:
    """RSS of a process and all its descendants (a platform's aggregation workers)."""
    total = 0.0
    try:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss / 2**20
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.NoSuchProcess:
        pass
    return total


def sample(root: psutil.Process) -> list[tuple[str, int, float]]:
    """(part, pid, rss MB) right now: the harness itself, and each of its direct children
    (a leaf process, the platform, the broker node behind its su/sh wrapper) with its
    descendants; the broker is keyed by its Erlang VM's pid (a restart makes a new one)."""
    try:
        out = [("harness", root.pid, root.memory_info().rss / 2**20)]
        children = root.children()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    for child in children:
        cmd = _cmd(child)
        if "platform serve" in cmd:
            out.append(("platform", child.pid, _tree_mb(child)))
        elif "spawn_main" in cmd:
            out.append(("leaves", child.pid, _tree_mb(child)))
        elif "/bk-sim-rabbit-" in cmd:
            try:
                beams = [p for p in child.children(recursive=True) if "beam" in p.name()]
            except psutil.NoSuchProcess:
                continue
            for beam in beams:
                out.append(("broker", beam.pid, _tree_mb(beam)))
    return out


def slope_mb_per_h(rows: list[tuple[float, int, float]]) -> float | None:
    """Common slope over time of RSS, one intercept per pid (a restart resets memory)."""
    groups: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for t, pid, mb in rows:
        groups[pid].append((t, mb))
    xs, ys = [], []
    for points in groups.values():
        # A fresh process grows while it imports and warms up: not a leak.
        first = min(t for t, _ in points)
        points = [(t, mb) for t, mb in points if t >= first + WARMUP_PER_PROCESS_S]
        if len(points) < 3:
            continue
        arr = np.asarray(points)
        xs.append(arr[:, 0] - arr[:, 0].mean())
        ys.append(arr[:, 1] - arr[:, 1].mean())
    if not xs:
        return None
    x, y = np.concatenate(xs), np.concatenate(ys)
    if float((x * x).sum()) == 0.0:
        return None
    return float((x * y).sum() / (x * x).sum()) * 3600.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=60.0)
    ap.add_argument("--replot", type=Path, help="re-summarise a memory.csv instead of running")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.replot is not None:
        with open(args.replot, newline="") as fh:
            old = [
                {
                    "t": float(r["t_s"]),
                    "part": r["part"],
                    "pid": int(r["pid"]),
                    "mb": float(r["rss_mb"]),
                }
                for r in csv.DictReader(fh)
            ]
        args.out.mkdir(parents=True, exist_ok=True)
        summary = summarize(
            old, args.warmup, ["(replot)", str(args.replot)], max(float(r["t"]) for r in old)
        )
        (args.out / "memory.json").write_text(json.dumps(summary, indent=2))
        _plot(old, summary, args.out / "memory.png")
        print(json.dumps(summary["parts"], indent=2))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    child = subprocess.Popen(command)
    root = psutil.Process(child.pid)
    rows: list[dict[str, Any]] = []
    with open(args.out / "memory.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["t_s", "part", "pid", "rss_mb"])
        while child.poll() is None:
            t = time.time() - t0
            for part, pid, mb in sample(root):
                writer.writerow([f"{t:.1f}", part, pid, f"{mb:.2f}"])
                rows.append({"t": t, "part": part, "pid": pid, "mb": mb})
            fh.flush()
            try:
                child.wait(args.every)
            except subprocess.TimeoutExpired:
                pass
    summary = summarize(rows, args.warmup, command, time.time() - t0)
    (args.out / "memory.json").write_text(json.dumps(summary, indent=2))
    _plot(rows, summary, args.out / "memory.png")
    print(json.dumps(summary["parts"], indent=2))
    return int(child.returncode or 0)


def summarize(
    rows: list[dict[str, Any]], warmup: float, command: list[str], duration: float
) -> dict[str, Any]:
    """Per part: samples, processes, peak, and the slope (MB/h) within process lifetimes."""
    summary: dict[str, Any] = {"command": command, "duration_s": duration, "parts": {}}
    for part in PARTS:
        mine = [(r["t"], r["pid"], r["mb"]) for r in rows if r["part"] == part]
        fit = [m for m in mine if m[0] >= warmup]
        summary["parts"][part] = {
            "samples": len(mine),
            "processes": len({m[1] for m in mine}),
            "max_mb": max((m[2] for m in mine), default=None),
            "slope_mb_per_h": slope_mb_per_h(fit),
        }
    return summary


def _summed(rows: list[tuple[float, int, float]]) -> list[tuple[float, int, float]]:
    by_t: dict[float, float] = defaultdict(float)
    for t, _, mb in rows:
        by_t[t] += mb
    return [(t, 0, mb) for t, mb in sorted(by_t.items())]


def _plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for part in PARTS:
        mine = [r for r in rows if r["part"] == part]
        if not mine:
            continue
        if part == "leaves":
            pts = _summed([(r["t"], r["pid"], r["mb"]) for r in mine])
            xs, ys = [p[0] / 60 for p in pts], [p[2] for p in pts]
        else:
            xs, ys = [r["t"] / 60 for r in mine], [r["mb"] for r in mine]
        slope = summary["parts"][part]["slope_mb_per_h"]
        label = f"{part} (slope {slope:+.1f} MB/h)" if slope is not None else part
        ax.plot(xs, ys, ".", markersize=2, label=label)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS, MB")
    ax.set_title("soak: resident memory over time (leaves summed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
