"""Broker selection against real endpoints: the local RabbitMQ, closed ports, bad credentials."""

from __future__ import annotations

import http.server
import socket
import socketserver
import sys
import threading
from pathlib import Path

import pika
import pytest
from click.testing import CliRunner

from bk_sim.broker import (
    BrokerEndpoints,
    ManagementAPI,
    check_socket_capacity,
    docker_available,
    provide_broker,
)
from bk_sim.broker import _provider as provider_mod
from bk_sim.cli import main
from bk_sim.errors import BrokerError

pytestmark = pytest.mark.rabbitmq

AMQP = "amqp://guest:guest@127.0.0.1:5672/"
MGMT = "http://guest:guest@127.0.0.1:15672/"
NO_DOCKER = "unix:///nonexistent/bk-sim-test/docker.sock"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_configured_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BK_SIM_AMQP_URL", raising=False)
    monkeypatch.delenv("BK_SIM_MANAGEMENT_URL", raising=False)
    monkeypatch.delenv("BK_SIM_BROKER_PROVIDER", raising=False)


def test_auto_chooses_the_local_broker_and_says_why(management: ManagementAPI) -> None:
    with provide_broker() as endpoints:
        assert endpoints.provider == "local"
        assert endpoints.reason.startswith(
            "local: RabbitMQ answered on 127.0.0.1:5672 and its management API on 15672"
        )
        assert endpoints.restartable is False
        assert endpoints.amqp_host_port() == ("127.0.0.1", 5672)
        assert endpoints.amqp_url is not None
        connection = pika.BlockingConnection(pika.URLParameters(endpoints.amqp_url))
        assert connection.is_open
        connection.close()


def test_external_with_a_dead_amqp_url_names_amqp(management: ManagementAPI) -> None:
    port = _closed_port()
    with pytest.raises(BrokerError) as info:
        with provide_broker(
            "external", amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/", management_url=MGMT
        ):
            pass
    message = str(info.value)
    assert f"AMQP check failed: nothing is listening on 127.0.0.1:{port}" in message
    assert "management API" not in message.replace("--management-url", "")


def test_external_with_wrong_management_credentials_names_them(
    management: ManagementAPI, unique: str
) -> None:
    with pytest.raises(BrokerError) as info:
        with provide_broker(
            "external",
            amqp_url=AMQP,
            management_url=f"http://nobody-{unique}:wrong@127.0.0.1:15672/",
        ):
            pass
    message = str(info.value)
    assert "management API check failed" in message
    assert f"refused the credentials of user 'nobody-{unique}'" in message
    assert "AMQP check failed" not in message
    assert "wrong" not in message  # the password is not echoed


def test_external_with_wrong_amqp_credentials_names_them(
    management: ManagementAPI, unique: str
) -> None:
    with pytest.raises(BrokerError, match="AMQP check failed: .*refused the credentials"):
        with provide_broker(
            "external", amqp_url=f"amqp://nobody-{unique}:x@127.0.0.1:5672/", management_url=MGMT
        ):
            pass


def test_external_with_swapped_ports_says_wrong_port(
    management: ManagementAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider_mod, "PROBE_TIMEOUT_S", 1.0)
    with pytest.raises(BrokerError) as info:
        with provide_broker(
            "external",
            amqp_url="amqp://guest:guest@127.0.0.1:15672/",
            management_url="http://guest:guest@127.0.0.1:5672/",
        ):
            pass
    message = str(info.value)
    # Within the short timeout the management port never completes a handshake.
    assert "AMQP check failed: 127.0.0.1:15672 accepted the connection but no AMQP" in message
    assert "wrong port in the AMQP URL" in message
    assert "something answered on 127.0.0.1:5672 but not HTTP" in message


def test_external_from_the_environment_when_both_answer(
    management: ManagementAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BK_SIM_AMQP_URL", AMQP)
    with provide_broker() as endpoints:
        assert endpoints.provider == "external"
        assert endpoints.management_url == MGMT  # derived from the AMQP URL
        assert "both answered (from the environment" in endpoints.reason
        assert "guest:guest" not in endpoints.reason


def test_auto_with_nothing_reachable_falls_back_to_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _closed_port()
    monkeypatch.setattr(provider_mod, "LOCAL_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{port}/")
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER)
    with provide_broker() as endpoints:
        assert endpoints.provider == "none"
        assert endpoints.amqp_url is None
        assert f"nothing listening on 127.0.0.1:{port}" in endpoints.reason
        assert "no Docker daemon answered" in endpoints.reason
        assert endpoints.reason.endswith("the run uses the WebSocket transport")


def test_testcontainers_without_docker_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", NO_DOCKER)
    assert docker_available()[0] is False
    with pytest.raises(BrokerError, match="needs Docker, but no Docker daemon answered"):
        with provide_broker("testcontainers"):
            pass


def test_local_without_management_names_the_plugin_command(
    management: ManagementAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    monkeypatch.setattr(
        provider_mod, "LOCAL_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{port}/"
    )
    with pytest.raises(BrokerError) as info:
        with provide_broker("local"):
            pass
    assert "run `rabbitmq-plugins enable rabbitmq_management`" in str(info.value)
    assert f"management API did not on 127.0.0.1:{port}" in str(info.value)


def test_local_enables_the_plugin_when_allowed_and_reports_progress(
    management: ManagementAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real plugin is already on (others share this broker), so the command is a harmless
    # stand-in and the API port a closed one: the flow must run it, say so, wait, then give up.
    port = _closed_port()
    monkeypatch.setattr(
        provider_mod, "LOCAL_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{port}/"
    )
    monkeypatch.setattr(provider_mod, "ENABLE_PLUGIN_COMMAND", (sys.executable, "-c", "pass"))
    monkeypatch.setattr(provider_mod, "PLUGIN_WAIT_S", 0.5)
    monkeypatch.setattr(provider_mod, "PLUGIN_POLL_S", 0.1)
    seen: list[str] = []
    with pytest.raises(BrokerError, match="succeeded but the management API .* still did not"):
        with provide_broker("local", may_enable_plugin=True, on_status=seen.append):
            pass
    assert any("running `" in line and sys.executable in line for line in seen)
    assert any("waiting for" in line for line in seen)


def test_local_plugin_command_failure_is_reported(
    management: ManagementAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _closed_port()
    monkeypatch.setattr(
        provider_mod, "LOCAL_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{port}/"
    )
    monkeypatch.setattr(
        provider_mod,
        "ENABLE_PLUGIN_COMMAND",
        (sys.executable, "-c", "import sys; sys.exit('plugins: permission denied')"),
    )
    with pytest.raises(BrokerError, match=r"failed \(exit 1\): plugins: permission denied"):
        with provide_broker("local", may_enable_plugin=True):
            pass


def test_socket_capacity_against_the_real_broker(management: ManagementAPI) -> None:
    with provide_broker("local") as endpoints:
        check_socket_capacity(endpoints, 5)  # a small run fits
        with pytest.raises(BrokerError) as info:
            check_socket_capacity(endpoints, 10_000_000)
    message = str(info.value)
    assert "RabbitMQ node rabbit@" in message
    assert "10000000 connections" in message
    assert 'rabbitmqctl stop; su rabbitmq -s /bin/sh -c "ulimit -n' in message


def test_cli_broker_check_prints_the_choice(management: ManagementAPI) -> None:
    result = CliRunner().invoke(main, ["broker", "check", "--needed-connections", "5"])
    assert result.exit_code == 0, result.output
    assert "provider:       local" in result.output
    assert "amqp_url:       amqp://guest:***@127.0.0.1:5672/" in result.output
    assert "capacity:       enough sockets for 5 connections" in result.output


def test_cli_broker_check_exits_2_naming_the_failure(management: ManagementAPI) -> None:
    port = _closed_port()
    result = CliRunner().invoke(
        main,
        [
            "broker",
            "check",
            "--provider",
            "external",
            "--amqp-url",
            f"amqp://g:g@127.0.0.1:{port}/",
        ],
    )
    assert result.exit_code == 2
    assert "AMQP check failed: nothing is listening" in result.output


class _FakeDockerHandler(http.server.BaseHTTPRequestHandler):
    """Answers the two calls docker.from_env().ping() makes, like a daemon would."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b'{"ApiVersion": "1.41", "Version": "20.10.0"}'
        if self.path.endswith("/_ping"):
            body = b"OK"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_docker_available_when_a_daemon_answers_the_ping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "docker.sock")

    class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
        daemon_threads = True

    class Handler(_FakeDockerHandler):
        def address_string(self) -> str:
            return "unix"

    with Server(path, Handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
            ok, why = docker_available()
        finally:
            server.shutdown()
            thread.join(5)
    assert ok, why
    assert why.startswith("Docker daemon answered")


def test_socket_capacity_without_monitoring_rights_says_which_tag(
    management: ManagementAPI, unique: str
) -> None:
    user = f"bk-sim-cap-{unique}"
    management.create_user(user, "pw", tags="management")
    try:
        endpoints = BrokerEndpoints("external", AMQP, f"http://{user}:pw@127.0.0.1:15672/", "r")
        with pytest.raises(BrokerError, match="could not read the broker's limits.*'monitoring'"):
            check_socket_capacity(endpoints, 10)
    finally:
        management.delete_user(user)


def test_management_api_decodes_url_credentials_and_refuses_non_json(
    management: ManagementAPI, unique: str
) -> None:
    from urllib.parse import quote

    user, password = f"bk-sim-mgmt-{unique}", "p@ss/w:rd%"
    management.create_user(user, password, tags="management")
    try:
        api = ManagementAPI(f"http://{user}:{quote(password, safe='')}@127.0.0.1:15672/")
        try:
            assert "rabbitmq_version" in api.overview()  # was a 401: sent still encoded
        finally:
            api.close()
    finally:
        management.delete_user(user)

    class _Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            body = b"<html>not rabbit</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    with socketserver.TCPServer(("127.0.0.1", 0), _Html) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            api = ManagementAPI(f"http://u:hunter2@127.0.0.1:{server.server_address[1]}/")
            with pytest.raises(BrokerError, match="not with JSON") as err:
                api.overview()
            api.close()
            assert "hunter2" not in str(err.value)
        finally:
            server.shutdown()
            thread.join(5)
    with pytest.raises(BrokerError, match="must be http") as err:
        ManagementAPI("htp://u:hunter2@127.0.0.1:15672/")
    assert "hunter2" not in str(err.value)
