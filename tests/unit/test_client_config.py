"""Client settings: flat kwargs, config objects, and ClientConfigError before any request."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from bk_sim.client import (
    APIConfig,
    Client,
    Credentials,
    RabbitMQConfig,
    RetryConfig,
    RunConfig,
    WebSocketConfig,
)
from bk_sim.client._client import resolve_settings
from bk_sim.errors import ClientConfigError

CREDS = {
    "id": "leaf-1",
    "name": "leaf-one",
    "session_token": "tok-SECRET",
    "owner_id": "owner",
    "tree_id": "tree",
    "branch_id": "branch",
}


@pytest.fixture()
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A socket that listens but never answers: any request the client made would hang
    there, so a ClientConfigError proves that the check came first; `accept` shows
    whether a connection was attempted."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock
    sock.close()


def _no_connection(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


def test_credentials_dict_and_dataclass_agree() -> None:
    creds = Credentials.from_dict(CREDS)
    assert creds.to_dict() == CREDS
    assert "tok-SECRET" not in repr(creds)
    assert resolve_settings(CREDS).credentials == resolve_settings(creds).credentials


@pytest.mark.parametrize(
    ("creds", "match"),
    [
        ({k: v for k, v in CREDS.items() if k != "tree_id"}, "missing: tree_id"),
        ({**CREDS, "branch_id": ""}, "credentials.branch_id"),
        ({**CREDS, "id": 5}, "credentials.id"),
        ({**CREDS, "session_token": None}, "credentials.session_token"),
        ({**CREDS, "session_token": "tok-SECRET\n"}, "session_token must not contain a line"),
        ({**CREDS, "id": "leaf\r\n"}, "credentials.id must not contain a line break"),
        (["id", "name"], "credentials must be"),
        ("leaf-1", "credentials must be"),
    ],
)
def test_bad_credentials_fail_before_any_request(
    listener: tuple[str, socket.socket], creds: Any, match: str
) -> None:
    url, sock = listener
    with pytest.raises(ClientConfigError, match=match) as info:
        Client(creds, host=url, notifications=False)
    assert "tok-SECRET" not in str(info.value)
    assert _no_connection(sock)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"host": "app.branchkey.com"}, "host must look like"),
        ({"host": "ftp://h"}, "host must look like"),
        ({"host": "http://h:99999"}, "bad port"),
        ({"host": "http://h/?x=1"}, "query"),
        ({"ssl": "yes"}, "ssl must be"),
        ({"proxies": "socks5://p:1080"}, "proxies must be a dict"),
        ({"proxies": {"https": "ftp://p:21"}}, r"proxies\['https'\]"),
        ({"proxies": {"https": "socks5://"}}, r"proxies\['https'\]"),
        ({"host": "http://[::1"}, r"host 'http://\[::1' is not a valid URL"),
        ({"proxies": {"http": "socks5://u:pw@[::1"}}, r"proxies\['http'\] is not a valid URL"),
        ({"rbmq_port": 0}, "rbmq_port"),
        ({"rbmq_port": "5671"}, "rbmq_port"),
        ({"rbmq_ssl": 1}, "rbmq_ssl"),
        ({"rbmq_host": ""}, "rbmq_host"),
        ({"rbmq_max_reconnect_attempts": -1}, "rbmq_max_reconnect_attempts"),
        ({"rbmq_reconnect_backoff_factor": 0}, "rbmq_reconnect_backoff_factor"),
        ({"rbmq_reconnect_max_delay": -1}, "rbmq_reconnect_max_delay"),
        ({"wait_for_run": "no"}, "wait_for_run"),
        ({"run_check_interval_s": 0}, "run_check_interval_s"),
        ({"retry_config": 3}, "retry_config must be"),
        ({"retry_config": {"max_retries": 1, "bogus": 2}}, "retry_config"),
        ({"retry_config": RetryConfig(status_forcelist=(503, 9999))}, "status_forcelist"),
        ({"retry_config": RetryConfig(allowed_methods=("get",))}, "allowed_methods"),
        ({"api_config": {"host": "http://h"}}, "api_config must be"),
        ({"websocket_config": WebSocketConfig(open_timeout=0)}, "open_timeout"),
        ({"run_config": RunConfig(check_interval_s=-1)}, "run_interval|run_check_interval_s"),
        ({"observer": object()}, "observer"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_bad_settings_fail_before_any_request(
    listener: tuple[str, socket.socket], kwargs: dict[str, Any], match: str
) -> None:
    url, sock = listener
    kwargs.setdefault("host", url)
    with pytest.raises(ClientConfigError, match=match):
        Client(CREDS, notifications=False, **kwargs)
    assert _no_connection(sock)


def test_bad_retry_values_are_config_errors() -> None:
    with pytest.raises(ClientConfigError, match="max_retries"):
        RetryConfig(max_retries=-1)
    with pytest.raises(ClientConfigError, match="total_timeout"):
        resolve_settings(CREDS, retry_config={"total_timeout": 0})


def test_a_proxy_password_is_not_shown() -> None:
    with pytest.raises(ClientConfigError) as info:
        resolve_settings(CREDS, proxies={"https": "gopher://user:hunter2@p:1"})
    assert "hunter2" not in str(info.value) and "user:***@p:1" in str(info.value)


def test_flat_kwargs_map_to_the_config_objects() -> None:
    s = resolve_settings(
        CREDS,
        host="https://bk.example:8443",
        rbmq_port=5672,
        rbmq_ssl=False,
        rbmq_max_reconnect_attempts=0,
        rbmq_reconnect_backoff_factor=3.0,
        rbmq_reconnect_max_delay=120,
        ssl=False,
        wait_for_run=True,
        run_check_interval_s=5,
        proxies={"https": "socks5h://127.0.0.1:1080"},
        retry_config={"max_retries": 5, "backoff_factor": 2.0},
    )
    assert s.api == APIConfig(
        "https://bk.example:8443", False, {"https": "socks5h://127.0.0.1:1080"}
    )
    assert s.rabbitmq == RabbitMQConfig(None, 5672, False, 0, 3.0, 120)
    assert s.run == RunConfig(True, 5)
    assert s.retry == RetryConfig(max_retries=5, backoff_factor=2.0)
    assert s.broker_host == "bk.example"  # rbmq_host None: the API host's hostname
    assert s.websocket_url == "wss://bk.example:8443/api/v1/ws"
    assert s.notifications and not s.use_websocket


def test_defaults_are_the_seed_readmes() -> None:
    s = resolve_settings(CREDS)
    assert s.api == APIConfig("https://app.branchkey.com", True, None)
    assert s.rabbitmq == RabbitMQConfig(None, 5671, True, 10, 2.0, 60)
    assert s.run == RunConfig(False, 30)
    assert s.retry == RetryConfig(
        3, 1.0, 30, (408, 429, 500, 502, 503, 504), ("GET", "POST", "PUT")
    )
    assert s.broker_host == "app.branchkey.com"
    assert str(s.output_dir) == "aggregated_output"


def test_config_objects_override_flat_kwargs() -> None:
    s = resolve_settings(
        Credentials.from_dict(CREDS),
        host="http://ignored",
        rbmq_host="ignored",
        rbmq_port=1,
        wait_for_run=False,
        api_config=APIConfig(host="http://api.local:8080", ssl=False),
        rabbitmq_config=RabbitMQConfig(host="mq.local", port=5672, ssl=False),
        run_config=RunConfig(wait_for_run=True, check_interval_s=1),
        websocket_config=WebSocketConfig(max_reconnect_attempts=3),
        use_websocket=True,
    )
    assert s.api.host == "http://api.local:8080" and s.api.ssl is False
    assert (s.broker_host, s.rabbitmq.port, s.rabbitmq.ssl) == ("mq.local", 5672, False)
    assert s.run.wait_for_run and s.websocket.max_reconnect_attempts == 3
    assert s.use_websocket and s.websocket_url == "ws://api.local:8080/api/v1/ws"
