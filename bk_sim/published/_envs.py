"""One isolated, cached virtual environment per published-client requirement.

The published releases pin requests and numpy (2.9.0 pins numpy 1.26.4), so they cannot
live in bk-sim's own environment, nor share one with each other. ``prepare`` builds
``<cache>/<requirement>/`` with ``python -m venv`` + ``pip install``, and reuses it while
it is healthy.

A build is never half-used: the marker file ``bk-sim-env.json`` is written (atomically)
only after pip succeeded and ``import branchkey`` worked in the new env; a folder without
it is a crashed build and is removed before building again. A lock file per requirement
keeps two runs from building the same env at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from bk_sim.errors import PublishedClientError, ScenarioError
from bk_sim.files import atomic_write
from bk_sim.published._requirement import BranchkeyRequirement, parse_requirement

log = logging.getLogger(__name__)

CACHE_ENV_VAR = "BK_SIM_CLIENTS_DIR"
"""Overrides where the envs live (default ``$XDG_CACHE_HOME/bk-sim/clients``)."""
MARKER = "bk-sim-env.json"
BUILD_TIMEOUT_S = 900.0
"""Upper bound for one ``pip install`` (a cold numpy download on a slow link)."""

Progress = Callable[[str], None]

_VERSIONS_CODE = (
    "import json, platform\n"
    "from importlib.metadata import version\n"
    "out = {'python': platform.python_version()}\n"
    "for name in ('branchkey', 'numpy', 'requests', 'urllib3', 'websockets'):\n"
    "    try:\n"
    "        out[name] = version(name)\n"
    "    except Exception:\n"
    "        out[name] = None\n"
    "print(json.dumps(out))\n"
)
_IMPORT_CODE = "import branchkey, branchkey.client\n" + _VERSIONS_CODE
_NO_MATCH = "No matching distribution found"
_UNREACHABLE = (
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Could not fetch URL",
    "ConnectTimeoutError",
    "Network is unreachable",
)
_PROGRESS = ("Collecting", "Downloading", "Installing", "Successfully")
_NOISE = ("is ignored: it is neither a file nor a directory",)


def default_cache_dir() -> Path:
    """``$BK_SIM_CLIENTS_DIR``, else ``$XDG_CACHE_HOME/bk-sim/clients`` (``~/.cache``)."""
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "bk-sim" / "clients"


def transports_for(branchkey_version: str) -> tuple[str, ...]:
    """The notification transports a release has: 2.x AMQP and WebSocket, 3.x WebSocket."""
    try:
        major = Version(branchkey_version).major
    except InvalidVersion:
        return ("websocket",)
    return ("websocket",) if major >= 3 else ("amqp", "websocket")


@dataclass(frozen=True)
class PublishedEnv:
    """A ready environment holding one published client release.

    ``requirement`` is what was asked for (canonical form); ``branchkey_version`` and
    ``numpy_version`` what pip resolved. ``implementation`` (``branchkey==X``) names the
    exact release in results, even when the requirement was a range.
    """

    requirement: str
    path: Path
    branchkey_version: str
    numpy_version: str
    python_version: str
    versions: dict[str, str | None]
    created_at: str
    build_seconds: float

    @property
    def python(self) -> Path:
        return _env_python(self.path)

    @property
    def implementation(self) -> str:
        return f"branchkey=={self.branchkey_version}"

    @property
    def transports(self) -> tuple[str, ...]:
        return transports_for(self.branchkey_version)

    def check_transport(self, transport: str) -> None:
        """Raise ``ScenarioError`` naming both when this release lacks ``transport``."""
        if transport not in self.transports:
            raise ScenarioError(
                f"transport {transport!r} is not available in {self.implementation} "
                f"(requirement {self.requirement}): it has {', '.join(self.transports)} only"
            )

    def size_bytes(self) -> int:
        """Bytes on disk under the env folder (symlinks not followed)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["implementation"] = self.implementation
        data["transports"] = list(self.transports)
        return data


def prepare(
    requirement: str,
    *,
    cache_dir: str | Path | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
    base_python: str | Path | None = None,
    timeout_s: float = BUILD_TIMEOUT_S,
) -> PublishedEnv:
    """The env for ``requirement``: the cached one when healthy, else built now.

    ``progress`` receives one line per build step (pip's own "Collecting ...",
    "Installing ..." lines included); by default they go to the log. ``refresh`` rebuilds
    even a healthy env (a range like ``branchkey>=3`` then picks up newer releases).
    Raises ``PublishedClientError`` (exit 2) for a malformed, unknown or uninstallable
    requirement, with pip's reason in one line.
    """
    req = parse_requirement(requirement)
    say = progress or (lambda line: log.info("%s", line))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    path = root / req.dirname
    with _build_lock(root / f".{req.dirname}.lock", req, say):
        if path.exists() and not refresh:
            env, problem = _load_healthy(path, req)
            if env is not None:
                say(f"{req}: using cached env {path} (branchkey {env.branchkey_version})")
                return env
            say(f"{req}: cached env at {path} is not usable ({problem}); rebuilding")
        if path.exists():
            shutil.rmtree(path)
        return _build(req, path, say, base_python or sys.executable, timeout_s)


def list_envs(cache_dir: str | Path | None = None) -> list[PublishedEnv]:
    """Every complete env in the cache (folders without a marker are crashed builds)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.is_dir():
        return []
    envs = []
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        env = _read_marker(child)
        if env is not None:
            envs.append(env)
    return envs


# --------------------------------------------------------------------------- internals


def _env_python(path: Path) -> Path:
    if sys.platform == "win32":  # pragma: no cover - bk-sim runs on POSIX
        return path / "Scripts" / "python.exe"
    return path / "bin" / "python"


@contextlib.contextmanager
def _build_lock(lock_path: Path, req: BranchkeyRequirement, say: Progress) -> Iterator[None]:
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{req}: waiting for another bk-sim process building the same env")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_marker(path: Path) -> PublishedEnv | None:
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
        versions = {str(k): (None if v is None else str(v)) for k, v in data["versions"].items()}
        return PublishedEnv(
            requirement=str(data["requirement"]),
            path=path,
            branchkey_version=str(data["branchkey_version"]),
            numpy_version=str(data["numpy_version"]),
            python_version=str(data["python_version"]),
            versions=versions,
            created_at=str(data["created_at"]),
            build_seconds=float(data["build_seconds"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _load_healthy(path: Path, req: BranchkeyRequirement) -> tuple[PublishedEnv | None, str]:
    env = _read_marker(path)
    if env is None:
        return None, "no complete build marker"
    if not env.python.exists():
        return None, f"{env.python} is missing"
    try:
        versions = _query_versions(env.python, _VERSIONS_CODE, timeout_s=60)
    except PublishedClientError as exc:
        return None, str(exc)
    if versions.get("branchkey") != env.branchkey_version:
        return (
            None,
            f"branchkey is {versions.get('branchkey')}, marker says {env.branchkey_version}",
        )
    if versions.get("numpy") != env.numpy_version:
        return None, f"numpy is {versions.get('numpy')}, marker says {env.numpy_version}"
    if not req.allows(env.branchkey_version):
        return None, f"branchkey {env.branchkey_version} does not satisfy {req}"
    return env, ""


def _query_versions(python: Path, code: str, *, timeout_s: float) -> dict[str, str | None]:
    try:
        proc = subprocess.run(
            [str(python), "-I", "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PublishedClientError(f"{python} could not run: {exc}") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PublishedClientError(f"{python} failed: {tail}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise PublishedClientError(f"{python} printed no version report") from None
    return {str(k): (None if v is None else str(v)) for k, v in data.items()}


def _build(
    req: BranchkeyRequirement, path: Path, say: Progress, base_python: str | Path, timeout_s: float
) -> PublishedEnv:
    started = time.monotonic()
    say(f"{req}: creating virtual env in {path}")
    try:
        subprocess.run(
            [str(base_python), "-m", "venv", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(path, ignore_errors=True)
        detail = getattr(exc, "stderr", None) or str(exc)
        raise PublishedClientError(
            f"{req}: could not create a virtual env in {path}: {str(detail).strip()[-200:]}"
        ) from None
    python = _env_python(path)
    say(f"{req}: pip install {req}")
    try:
        _pip_install(python, req, say, timeout_s)
        versions = _query_versions(python, _IMPORT_CODE, timeout_s=120)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    branchkey_version = versions.get("branchkey")
    numpy_version = versions.get("numpy")
    if branchkey_version is None or numpy_version is None:
        shutil.rmtree(path, ignore_errors=True)
        raise PublishedClientError(f"{req}: pip succeeded but branchkey or numpy is missing")
    elapsed = round(time.monotonic() - started, 2)
    marker = {
        "requirement": req.text,
        "branchkey_version": branchkey_version,
        "numpy_version": numpy_version,
        "python_version": versions.get("python") or "",
        "versions": versions,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": elapsed,
    }
    atomic_write(path / MARKER, json.dumps(marker, indent=2) + "\n")
    env = _read_marker(path)
    if env is None:  # pragma: no cover - we just wrote it
        raise PublishedClientError(f"{req}: could not read back {path / MARKER}")
    say(
        f"{req}: ready in {elapsed:.1f} s (branchkey {branchkey_version}, "
        f"numpy {numpy_version}, python {env.python_version})"
    )
    return env


def _pip_install(python: Path, req: BranchkeyRequirement, say: Progress, timeout_s: float) -> None:
    cmd = [
        str(python),
        "-I",
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        req.text,
    ]
    tail: deque[str] = deque(maxlen=400)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    )
    stdout = proc.stdout
    assert stdout is not None

    def relay() -> None:
        """pip's lines as progress; in a thread so a silent, hung pip still times out."""
        for raw in stdout:
            line = raw.rstrip()
            if not line or any(noise in line for noise in _NOISE):
                continue
            tail.append(line)
            if line.lstrip().startswith(_PROGRESS):
                say(f"{req}: pip: {line.strip()}")

    reader = threading.Thread(target=relay, name="pip-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        code = proc.wait()
    finally:
        reader.join(timeout=10)
        stdout.close()
    if timed_out:
        raise PublishedClientError(f"{req}: pip install did not finish within {timeout_s:.0f} s")
    if code == 0:
        return
    text = "\n".join(tail)
    # pip says "No matching distribution" also when it reached no index: unreachable first
    for marker in _UNREACHABLE:
        if marker in text:
            raise PublishedClientError(
                f"{req}: the package registry could not be reached (pip: "
                f"{_first_line(text, marker)})"
            )
    if _NO_MATCH in text:
        known = re.search(r"\(from versions: ([^)]*)\)", text)
        offer = f"; releases: {known.group(1)}" if known else ""
        raise PublishedClientError(f"{req}: no release of branchkey matches{offer}"[:600])
    errors = [line.strip() for line in tail if line.strip().startswith("ERROR")]
    reason = errors[-1] if errors else (tail[-1].strip() if tail else f"exit code {code}")
    raise PublishedClientError(f"{req}: pip install failed: {reason[:300]}")


def _first_line(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return line.strip()[:300]
    return needle
