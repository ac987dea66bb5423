"""Start the reference platform as a child process and stop it cleanly.

A subprocess, not a thread: the platform's CPU (validation, aggregation) stays out of the
harness's process, and a test can kill and restart it on the same port and data dir to
prove nothing is lost. The admin token travels in the environment, never on the command
line (where ``ps`` would show it).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bk_sim.broker import DEFAULT_MANAGEMENT_URL
from bk_sim.errors import PlatformError
from bk_sim.platform._admin_client import AdminClient
from bk_sim.platform._app import DEFAULT_AMQP_URL
from bk_sim.platform._limits import Limits

STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class PlatformHandle:
    """A running platform process: ``url``, ``admin_token``, ``admin``, ``stop()``."""

    def __init__(
        self,
        data_dir: Path,
        args: list[str],
        env: dict[str, str],
        admin_token: str,
        host: str,
        port: int,
        startup_timeout: float,
        tls_ca: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.admin_token = admin_token
        self._args = args
        self._env = env
        self._host = host
        self._port = port
        self._startup_timeout = startup_timeout
        self._tls_ca = tls_ca
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin: AdminClient = AdminClient("http://unused", admin_token)
        self._launch()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "platform.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _launch(self) -> None:
        ready = self.data_dir / "platform.ready.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "bk_sim.cli",
            "-v",
            "platform",
            "serve",
            "--host",
            self._host,
            "--port",
            str(self._port),
            "--data-dir",
            str(self.data_dir),
            "--ready-file",
            str(ready),
            "--exit-on-stdin-eof",
            *self._args,
        ]
        with open(self.log_path, "ab") as log:
            # stdin is a pipe we never write: when this process dies, the platform sees EOF.
            # Its own session: a Ctrl-C meant for the harness must not kill the platform
            # before the harness has read its round records.
            self._proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self._startup_timeout
        while not ready.exists():
            if self._proc.poll() is not None:
                if self._proc.stdin is not None:
                    self._proc.stdin.close()
                raise PlatformError(
                    f"the platform exited with code {self._proc.returncode} before it was "
                    f"ready: {_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise PlatformError(
                    f"the platform was not ready after {self._startup_timeout:g}s: "
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.05)
        self.url = json.loads(ready.read_text())["url"]
        self._port = int(self.url.rsplit(":", 1)[1])
        self.admin.close()
        self.admin = AdminClient(self.url, self.admin_token)
        if self._tls_ca is not None:  # HTTPS with a run's own CA: verify against it alone
            self.admin._session.trust_env = False  # REQUESTS_CA_BUNDLE would win over verify
            self.admin._session.verify = str(self._tls_ca)

    def stop(self, *, kill: bool = False, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (graceful: open rounds stay in the store) or SIGKILL with ``kill``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdin is not None:
            proc.stdin.close()
        self.admin.close()

    def restart(self, *, kill: bool = False) -> None:
        """Stop and start again on the same port and data dir (leaves keep their URL)."""
        self.stop(kill=kill)
        self._launch()

    def __enter__(self) -> PlatformHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def start_platform(
    data_dir: str | Path,
    *,
    amqp_url: str = DEFAULT_AMQP_URL,
    management_url: str = DEFAULT_MANAGEMENT_URL,
    no_amqp: bool = False,
    admin_token: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    public_url: str | None = None,
    max_upload_bytes: int | None = None,
    max_decompressed_bytes: int | None = None,
    limits: Limits | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
) -> PlatformHandle:
    """Start ``bk-sim platform serve`` in a child process; returns once it serves.

    ``tls_cert`` / ``tls_key``: serve HTTPS and WSS; ``tls_ca`` is what ``handle.admin``
    verifies the platform against (a run's own CA).

    ``limits``: timeouts, connection cap, bytes in flight, quotas (``Limits``).

    ``port=0`` picks a free port (see ``handle.url``); the log is
    ``<data_dir>/platform.log``. Raises ``PlatformError`` with the log's tail if it fails.
    """
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    token = admin_token or secrets.token_urlsafe(24)
    env = dict(os.environ)
    env["BK_SIM_ADMIN_TOKEN"] = token
    env["BK_SIM_AMQP_URL"] = amqp_url
    env["BK_SIM_RABBITMQ_API"] = management_url
    args: list[str] = []
    if no_amqp:
        args.append("--no-amqp")
    if public_url:
        args += ["--public-url", public_url]
    if max_upload_bytes is not None:
        args += ["--max-upload-bytes", str(max_upload_bytes)]
    if max_decompressed_bytes is not None:
        args += ["--max-decompressed-bytes", str(max_decompressed_bytes)]
    if limits is not None:
        args += limits.as_args()
    if tls_cert is not None or tls_key is not None:
        args += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
    return PlatformHandle(path, args, env, token, host, port, startup_timeout, tls_ca)
