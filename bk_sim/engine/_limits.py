"""Limits that follow from the model, and a run refused before it starts (issue 17).

A 1 GB model used to fail ten minutes in, with a 413 from the platform's 512 MiB default
upload limit, or to take the machine's memory. ``platform_limits`` derives the local
platform's upload and decoded-archive limits from the scenario's model (or takes the
scenario's explicit ``platform.max_upload_bytes`` / ``platform.max_decompressed_bytes``);
``preflight`` refuses, with the numbers and the setting to change, a scenario whose model
exceeds explicit limits, or whose memory or disk estimate exceeds what this machine has.

Estimates, from the bound the run then checks (``_memory``): the orchestrator and the
platform 3 x S each, each leaf process 3 x S per leaf it hosts, plus ~150 MiB at rest per
process (S: one upload decoded). Disk: every upload of every round (the platform keeps
them), the aggregates twice (platform and run folder) and one file per leaf being written.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

from bk_sim.errors import ScenarioError
from bk_sim.scenario import Scenario

__all__ = ["PlatformLimits", "platform_limits", "preflight"]

#: The platform's defaults (``bk-sim platform serve``): limits never go below them.
DEFAULT_MAX_UPLOAD = 512 * 2**20
DEFAULT_MAX_DECOMPRESSED = 2 * 2**30
#: A Python process with numpy, requests, pika and aiohttp, before any model.
AT_REST_BYTES = 150 * 2**20
_MiB = 2**20


@dataclass(frozen=True)
class PlatformLimits:
    max_upload_bytes: int
    max_decompressed_bytes: int
    #: what one upload of the model needs
    upload_needs: int
    decompressed_needs: int


def _needs(scenario: Scenario) -> tuple[int, int]:
    """(archive bytes, decoded bytes) of the largest upload the model makes."""
    layers = scenario.model.layers
    decoded = scenario.model.nbytes + 8 + 128 * (len(layers) + 1)  # .npy headers, weighting
    # Deflate never grows data by more than ~0.03 % (stored blocks); ZIP headers ~100 B each.
    archive = decoded + math.ceil(decoded * 0.001) + 256 * (len(layers) + 1)
    return archive, decoded


def platform_limits(scenario: Scenario) -> PlatformLimits:
    """The local platform's limits: explicit, else the defaults raised to fit the model."""
    p = scenario.platform
    upload_needs, decoded_needs = _needs(scenario)
    upload = p.max_upload_bytes or max(DEFAULT_MAX_UPLOAD, upload_needs + _MiB)
    decoded = p.max_decompressed_bytes or max(DEFAULT_MAX_DECOMPRESSED, decoded_needs + _MiB)
    return PlatformLimits(upload, decoded, upload_needs, decoded_needs)


def _fmt(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / _MiB:.0f} MiB"


def preflight(scenario: Scenario, work_dir: Path) -> None:
    """Raise ``ScenarioError`` (exit 2) when the scenario cannot fit; say what to change."""
    params = sum(layer.size for layer in scenario.model.layers)
    s = scenario.model.nbytes
    what = f"the model ({params:,} parameters) makes uploads of {_fmt(s)} decoded"
    if scenario.platform.mode == "local":
        lim = platform_limits(scenario)
        if lim.max_upload_bytes < lim.upload_needs:
            raise ScenarioError(
                f"platform.max_upload_bytes: {what}, up to {lim.upload_needs:,} bytes as an "
                f"archive, over the limit of {lim.max_upload_bytes:,}; raise "
                f"platform.max_upload_bytes to at least {lim.upload_needs:,} (or remove it: "
                "it then follows from the model)"
            )
        if lim.max_decompressed_bytes < lim.decompressed_needs:
            raise ScenarioError(
                f"platform.max_decompressed_bytes: {what} ({lim.decompressed_needs:,} bytes), "
                f"over the limit of {lim.max_decompressed_bytes:,}; raise "
                f"platform.max_decompressed_bytes to at least {lim.decompressed_needs:,} "
                "(or remove it: it then follows from the model)"
            )
    leaves = scenario.leaves.count
    local = scenario.platform.mode == "local"
    nproc = scenario.leaves.processes or leaves
    processes = 1 + (1 if local else 0) + min(nproc, leaves)
    memory = 3 * s * (1 + (1 if local else 0) + leaves) + AT_REST_BYTES * processes
    available = psutil.virtual_memory().available
    if memory > available:
        raise ScenarioError(
            f"model: {what}; {leaves} leaves need up to {_fmt(memory)} of memory "
            f"(3 x {_fmt(s)} for the orchestrator{', the platform' if local else ''} and "
            f"each leaf, + {_fmt(AT_REST_BYTES)} a process), but {_fmt(available)} is "
            "available; lower leaves.count or the model's size (model.layers)"
        )
    rounds = scenario.rounds
    disk = s * ((leaves * rounds + 2 * rounds) if local else 2 * rounds) + s * leaves
    for folder in {Path(scenario.report.dir), work_dir}:
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if disk > free:
            raise ScenarioError(
                f"model: {what}; {leaves} leaves x {rounds} rounds need up to {_fmt(disk)} "
                f"of disk under {folder}, but {_fmt(free)} is free; free space, or lower "
                "leaves.count, rounds or the model's size"
            )
