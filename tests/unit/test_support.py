"""A missing service skips a test locally, saying why, and fails it under CI=true."""

from __future__ import annotations

import pytest

from tests.support import unavailable


def test_without_ci_a_missing_service_skips_with_its_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="RabbitMQ is not listening"):
        unavailable("RabbitMQ is not listening")


def test_under_ci_a_missing_service_fails_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true and chromium is not installed"):
        unavailable("chromium is not installed")


def test_the_recorder_wakes_a_waiter_on_the_event_and_names_what_it_missed() -> None:
    import threading

    from bk_sim.client import ClientEvent
    from tests.support import Recorder

    rec = Recorder()
    threading.Timer(0.05, rec.on_event, (ClientEvent(kind="connect", leaf_id="leaf-1"),)).start()
    rec.wait_count("connect", 1, timeout=10)  # returns on the event, not after 10 s
    assert [e.kind for e in rec.of("connect")] == ["connect"]
    with pytest.raises(AssertionError, match="1 disconnect event"):
        rec.wait_count("disconnect", 1, timeout=0.01)
