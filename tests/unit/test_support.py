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
