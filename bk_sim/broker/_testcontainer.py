"""A throwaway RabbitMQ in Docker (testcontainers), for machines without a broker.

Used by ``provide_broker("testcontainers")`` and by ``auto`` when nothing else is there.
The container is ``rabbitmq:3-management`` with AMQP (5672) and the management API (15672)
published, a high open-file limit (so a large run is not capped at ~830 sockets), and it is
removed with its volume when the run ends, whatever happens (testcontainers' Ryuk reaper
also removes it if this process dies).

Restarts for chaos are ``docker restart`` of the same container: its anonymous volume at
``/var/lib/rabbitmq`` and its hostname (hence the node name) survive, so durable queues,
users and vhosts come back. When the Docker daemon runs on this machine, the host ports are
chosen up front and bound to 127.0.0.1, so they stay the same across restarts and clients
reconnect to the same URL; with a remote ``DOCKER_HOST`` Docker picks the ports, which may
change on restart: the new URLs are re-read and returned.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from bk_sim.errors import BrokerError

logger = logging.getLogger(__name__)

IMAGE = "rabbitmq:3-management"
USER = "guest"
PASSWORD = "guest"
AMQP_PORT = 5672
MANAGEMENT_PORT = 15672
NOFILE_LIMIT = 65536
DOCKER_PING_TIMEOUT_S = 2.0
DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock"
READY_TIMEOUT_S = 120.0
READY_POLL_S = 1.0
STOP_TIMEOUT_S = 10

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
_START_ATTEMPTS = 3

Status = Callable[[str], None]
# (amqp_url, management_url) -> None, raising BrokerError while not ready.
ReadyCheck = Callable[[str, str], None]


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def docker_available(timeout: float = DOCKER_PING_TIMEOUT_S) -> tuple[bool, str]:
    """Whether a Docker daemon answers a ping, and a short reason either way."""
    # The docker SDK leaks its socket when the daemon is absent (a ResourceWarning at
    # exit), so first look at the endpoint ourselves; only a live one gets the SDK ping.
    problem = _docker_endpoint_problem(timeout)
    if problem:
        return False, problem
    try:
        import docker
        import requests
    except ImportError as exc:  # pragma: no cover - both are dependencies
        return False, f"the docker SDK is not installed ({exc})"
    try:
        client = docker.from_env(timeout=max(1, round(timeout)))
        try:
            client.ping()
            where = client.api.base_url
        finally:
            client.close()
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        return False, _one_line(exc)
    return True, f"Docker daemon answered at {where}"


def _docker_endpoint_problem(timeout: float) -> str | None:
    """Why DOCKER_HOST (default: the local socket) cannot be a daemon, or None to go on."""
    host = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_DOCKER_SOCKET}"
    where = f"DOCKER_HOST={host}"
    if not os.environ.get("DOCKER_HOST"):
        where = f"{host} (DOCKER_HOST unset)"
    try:
        if host.startswith("unix://"):
            path = host[len("unix://") :]
            if not os.path.exists(path):
                return f"no Docker socket at {where}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(path)
        elif host.startswith("tcp://"):
            parts = urlsplit(host)
            address = (parts.hostname or "127.0.0.1", parts.port or 2375)
            with socket.create_connection(address, timeout=timeout):
                pass
    except OSError as exc:
        return f"nothing answered at {where}: {exc.strerror or exc}"
    return None


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now (all held open while choosing)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class RabbitContainer:
    """One running ``rabbitmq:3-management`` container; ``start`` it, ``restart``, ``stop``."""

    def __init__(self, container: Any, *, stable_ports: bool, ready: ReadyCheck) -> None:
        self._container = container
        self._stable_ports = stable_ports
        self._ready = ready
        self.host = "127.0.0.1"
        self.amqp_port = 0
        self.management_port = 0

    # -- lifecycle
    @classmethod
    def start(
        cls,
        ready: ReadyCheck,
        *,
        image: str = IMAGE,
        on_status: Status | None = None,
        timeout: float = READY_TIMEOUT_S,
    ) -> RabbitContainer:
        """Start the container and wait until AMQP and the management API both answer."""
        _say(on_status, f"testcontainers: starting a throwaway {image} container")
        last: BaseException | None = None
        for _ in range(_START_ATTEMPTS):
            try:
                container = _build(image)
            except Exception as exc:
                raise BrokerError(f"testcontainers: no usable Docker: {_one_line(exc)}") from exc
            handle = cls(container, stable_ports=False, ready=ready)
            handle._stable_ports = handle._bind_local_ports()
            try:
                handle._container.start()
            except BaseException as exc:  # docker SDK / testcontainers errors vary by version
                handle.stop()
                if not isinstance(exc, Exception):
                    raise  # Ctrl-C while pulling or starting: removed, now stop
                if "already allocated" in str(exc) or "address already in use" in str(exc):
                    last = exc  # a chosen free port was taken meanwhile: choose again
                    continue
                raise BrokerError(
                    f"testcontainers: could not start {image}: {_one_line(exc)}"
                ) from exc
            try:
                handle._read_ports()
                handle._wait_ready(timeout, on_status)
            except BaseException:
                handle.stop()
                raise
            return handle
        raise BrokerError(
            f"testcontainers: could not publish ports for {image}: {_one_line(last or Exception())}"
        )

    def restart(self, timeout: float = READY_TIMEOUT_S, on_status: Status | None = None) -> None:
        """``docker restart`` the broker (volume kept) and wait until it answers again."""
        _say(on_status, f"testcontainers: restarting container {self.container_id[:12]}")
        try:
            self._container.get_wrapped_container().restart(timeout=STOP_TIMEOUT_S)
        except Exception as exc:
            raise BrokerError(f"testcontainers: docker restart failed: {_one_line(exc)}") from exc
        before = (self.amqp_port, self.management_port)
        self._read_ports()
        if (self.amqp_port, self.management_port) != before:
            logger.warning(
                "broker ports changed on restart: %s -> %s (remote Docker host)",
                before,
                (self.amqp_port, self.management_port),
            )
        self._wait_ready(timeout, on_status)

    def stop(self) -> None:
        """Remove the container and its volume; never raises (teardown must not mask)."""
        try:
            self._container.stop()
        except Exception as exc:
            logger.warning(
                "could not remove the broker container: %s (remove it with docker rm -fv)",
                _one_line(exc),
            )

    # -- what clients use
    @property
    def container_id(self) -> str:
        return str(self._container.get_container_id())

    @property
    def amqp_url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{self.host}:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        return f"http://{USER}:{PASSWORD}@{self.host}:{self.management_port}/"

    # -- helpers
    def _bind_local_ports(self) -> bool:
        """Pick host ports now (Docker on this machine) so restarts keep them; else let Docker."""
        try:
            host = self._container.get_docker_client().host()
        except Exception:
            return False
        if host not in _LOCAL_HOSTS or _inside_container():
            return False
        # docker SDK form ("ip", port): published on loopback only, not on every interface.
        amqp, management = _free_ports(2)
        self._container.ports[str(AMQP_PORT)] = ("127.0.0.1", amqp)
        self._container.ports[str(MANAGEMENT_PORT)] = ("127.0.0.1", management)
        return True

    def _read_ports(self) -> None:
        try:
            host = self._container.get_container_host_ip()
            self.amqp_port = int(self._container.get_exposed_port(AMQP_PORT))
            self.management_port = int(self._container.get_exposed_port(MANAGEMENT_PORT))
        except Exception as exc:
            raise BrokerError(f"testcontainers: could not read the published ports: {exc}") from exc
        self.host = "127.0.0.1" if host in _LOCAL_HOSTS else host

    def _wait_ready(self, timeout: float, on_status: Status | None) -> None:
        _say(on_status, f"testcontainers: waiting for RabbitMQ on {self.host}:{self.amqp_port}")
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._ready(self.amqp_url, self.management_url)
                return
            except BrokerError as exc:
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"testcontainers: RabbitMQ in container {self.container_id[:12]} did not "
                        f"answer within {timeout:g}s: {exc}"
                    ) from exc
            time.sleep(READY_POLL_S)


def _inside_container() -> bool:
    """Inside a container, testcontainers reaches others through a gateway, not loopback."""
    from testcontainers.core.utils import inside_container

    return bool(inside_container())


def _build(image: str) -> Any:
    """The container description: guest user, both ports, a high open-file limit."""
    from docker.types import Ulimit
    from testcontainers.core.container import DockerContainer

    return (
        DockerContainer(image)
        .with_env("RABBITMQ_DEFAULT_USER", USER)
        .with_env("RABBITMQ_DEFAULT_PASS", PASSWORD)
        .with_exposed_ports(AMQP_PORT, MANAGEMENT_PORT)
        .with_kwargs(ulimits=[Ulimit(name="nofile", soft=NOFILE_LIMIT, hard=NOFILE_LIMIT)])
    )


def _say(on_status: Status | None, message: str) -> None:
    logger.info("%s", message)
    if on_status is not None:
        on_status(message)
