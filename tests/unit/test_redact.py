"""The one URL-redaction helper: passwords and query strings never reach a person."""

from __future__ import annotations

import pytest

from bk_sim.redact import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://bob:s3cret@h:5672/v", "amqp://bob:***@h:5672/v"),
        ("http://h:15672/", "http://h:15672/"),
        ("amqp://bob:s3cret@[::1]:x/", "amqp://bob:***@[::1]:x/"),
        ("ftp://u:pw@h:99999", "ftp://u:***@h:99999"),  # a bad port must not raise
        ("https://p/file/1?expires=9&sig=SECRET", "https://p/file/1"),
        ("http://[::1/blob?sig=SECRET", "http://[::1/blob"),
        ("socks5://user@proxy:1080", "socks5://user@proxy:1080"),
        ("https://u:pw@h/x#frag", "https://u:***@h/x"),
    ],
)
def test_redact_url_hides_password_and_query(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_url_of_nothing_is_a_dash() -> None:
    assert redact_url(None) == "-"
