"""Shared test helpers: the one recording observer, and "required here" for CI.

``Recorder`` is what every test that watches a client uses: it keeps the client's events
(and notification messages) and lets a test wait for a condition with a timeout instead
of sleeping. ``unavailable`` skips a test whose service is missing, saying why, but fails
it under ``CI=true``: CI must never pass green with tests unrun.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import pytest

from bk_sim.client import ClientEvent


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; under CI=true fail instead (a missing service is a broken CI)."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class Recorder:
    """An observer that keeps every event and message; ``wait`` blocks until a condition
    holds (or fails the test after ``timeout`` with what was seen)."""

    events: list[ClientEvent] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    #: raise from ``on_message`` for the messages it picks (a failing handler)
    fail_on: Callable[[dict[str, Any]], bool] | None = None

    def on_event(self, event: ClientEvent) -> None:
        with self.cond:
            self.events.append(event)
            self.cond.notify_all()

    def on_message(self, message: dict[str, Any]) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()
        if self.fail_on is not None and self.fail_on(message):
            raise RuntimeError("handler failure on purpose")

    def of(self, kind: str, endpoint: str | None = None) -> list[ClientEvent]:
        with self.cond:
            return [
                e
                for e in self.events
                if e.kind == kind and (endpoint is None or e.endpoint == endpoint)
            ]

    def wait(self, what: Callable[[], bool], timeout: float, why: str) -> None:
        with self.cond:
            ok = self.cond.wait_for(what, timeout)
        assert ok, f"timed out after {timeout} s waiting for {why}; events: {self.summary()}"

    def wait_count(self, kind: str, n: int, timeout: float) -> None:
        self.wait(lambda: len(self.of(kind)) >= n, timeout, f"{n} {kind} event(s)")

    def wait_messages(self, n: int, timeout: float) -> None:
        self.wait(lambda: len(self.messages) >= n, timeout, f"{n} message(s)")

    def summary(self) -> list[str]:
        with self.cond:
            return [f"{e.kind}:{e.attempt}:{e.delay_s}:{e.error}" for e in self.events]
