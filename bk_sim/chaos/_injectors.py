"""The injectors: broker (management API, app restart), network (the proxy), HTTP, leaves.

Each injector does one thing to the run's real parts and returns at once (a broker
restart waits until the broker answers again). They raise ``BkSimError`` subclasses; the
engine records a failed injection in the event log and carries on.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from bk_sim.broker import BrokerEndpoints, ManagementAPI, restart_broker
from bk_sim.errors import BrokerError, ScenarioError

_log = logging.getLogger(__name__)

#: Runs a command (argv) and returns its exit code; replaced by a fake in tests.
CommandRunner = Callable[[Sequence[str]], int]
BROKER_READY_TIMEOUT_S = 60.0
DEFAULT_RESTART_COMMAND: tuple[str, ...] = ("rabbitmqctl",)
_APP_COMMAND_TIMEOUT_S = 120.0


def run_command(argv: Sequence[str]) -> int:
    """The real runner: ``subprocess.run`` with a timeout; output goes to the log."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=_APP_COMMAND_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"chaos: {' '.join(argv)} could not run: {exc}") from exc
    if done.returncode != 0:
        _log.warning("%s exited %d: %s", " ".join(argv), done.returncode, done.stderr.strip())
    return done.returncode


class BrokerInjector:
    """Faults on the broker: force-closed connections, lost channels, an app restart."""

    def __init__(
        self,
        endpoints: BrokerEndpoints,
        *,
        tree_id: str,
        branch_id: str,
        restartable: bool,
        restart_command: Sequence[str] = DEFAULT_RESTART_COMMAND,
        runner: CommandRunner = run_command,
    ) -> None:
        self.endpoints = endpoints
        self._tree = tree_id
        self._branch = branch_id
        self._restartable = restartable
        self._command = tuple(restart_command)
        self._runner = runner
        self._api: ManagementAPI | None = None

    @property
    def api(self) -> ManagementAPI:
        if self._api is None:
            if not self.endpoints.management_url:
                raise BrokerError("chaos: the broker has no management API to inject faults")
            self._api = ManagementAPI(self.endpoints.management_url)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()

    def kill_connections(self, leaf_ids: Sequence[str]) -> None:
        """Force-close the leaves' connections: clients see 320 CONNECTION_FORCED."""
        for leaf in leaf_ids:
            self.api.close_user_connections(leaf, reason="bk-sim chaos")

    def close_channel(self, leaf_ids: Sequence[str]) -> None:
        """Delete and re-declare each leaf's queue (and its binding): the consumer is
        cancelled by the broker, a channel-level loss; the connection itself stays up."""
        for leaf in leaf_ids:
            self.api.delete_queue(self._tree, leaf)
            self.api.declare_queue(self._tree, leaf)
            self.api.bind(self._tree, self._branch, leaf)

    def check_restartable(self) -> None:
        """Refuse (``ScenarioError``) unless the scenario says the broker is the run's own."""
        if not self._restartable:
            raise ScenarioError(
                "chaos: restart_broker needs chaos.broker_restartable: true (it stops the "
                "broker for everyone using it)"
            )
        # An external broker only with a command that names it: the default `rabbitmqctl`
        # would restart the local node, which may not be the run's broker at all.
        named = self._command != DEFAULT_RESTART_COMMAND
        if self.endpoints.provider not in ("process", "testcontainers", "local") and not (
            self.endpoints.provider == "external" and named
        ):
            raise ScenarioError(
                f"chaos: restart_broker cannot restart a {self.endpoints.provider!r} broker: "
                "only 'process' (bk-sim's own node), 'testcontainers' (docker restart), "
                "'local' (rabbitmqctl), or "
                "'external' with a chaos.restart_command that reaches it (e.g. "
                "[rabbitmqctl, -n, NODE])"
            )

    def restart(self) -> BrokerEndpoints:
        """Restart the broker application and wait until its AMQP port takes connections."""
        self.check_restartable()
        if self.endpoints.provider in ("process", "testcontainers"):
            self.endpoints = restart_broker(self.endpoints)
            return self.endpoints
        for verb in ("stop_app", "start_app"):
            code = self._runner((*self._command, verb))
            if code != 0:
                raise BrokerError(f"chaos: {' '.join((*self._command, verb))} exited {code}")
        self._wait_ready()
        return self.endpoints

    def _wait_ready(self) -> None:
        host, port = self.endpoints.amqp_host_port()
        deadline = time.monotonic() + BROKER_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                self.api.overview()
                with socket.create_connection((host, port), timeout=1):
                    return
            except (OSError, BrokerError):
                time.sleep(0.5)
        raise BrokerError(
            f"chaos: broker not answering {BROKER_READY_TIMEOUT_S:g} s after start_app"
        )


class HttpInjector:
    """Platform HTTP faults on top of the scenario's own: set for a while, then restored."""

    def __init__(self, admin: Any, branch_id: str, base: dict[str, Any]) -> None:
        self._admin = admin
        self._branch = branch_id
        self._base = base
        self._active: dict[str, dict[str, Any]] = {}

    def use(self, admin: Any) -> None:
        """Talk to the platform through ``admin`` from now on (it was restarted), and set
        the rules again: a restarted platform starts without the faults set at runtime."""
        self._admin = admin
        self._apply()

    def add(self, name: str, rule: dict[str, Any]) -> None:
        self._active[name] = rule
        self._apply()

    def remove(self, name: str) -> None:
        if self._active.pop(name, None) is not None:
            self._apply()

    def _apply(self) -> None:
        """Set base + active rules; rules already set keep what is left of their ``count``
        (setting faults resets the platform's counters)."""
        current = list(self._admin.faults(self._branch).get("http") or [])
        rules = [*self._base.get("http", []), *self._active.values()]
        merged = []
        for rule in rules:
            rule = dict(rule)
            match = next((c for c in current if _same_rule(c, rule)), None)
            if match is not None:
                current.remove(match)
                rule["count"] = match.get("count")
            merged.append(rule)
        payload = dict(self._base)
        payload["http"] = merged
        self._admin.set_faults(self._branch, payload)


def _same_rule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("endpoint", "status", "rate", "retry_after", "latency_s", "reset", "drop_response")
    return all(a.get(k) == b.get(k) for k in keys)
