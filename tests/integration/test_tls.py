"""TLS end to end on loopback: a run's CA, the platform on HTTPS/WSS, bk-sim's own broker
node on AMQPS, and the leaf client with its defaults (ssl=True, rbmq_ssl=True, port 5671)
trusting the run's CA through REQUESTS_CA_BUNDLE / SSL_CERT_FILE. A client given another
CA fails at once with a certificate error, without retrying."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bk_sim.broker import BrokerEndpoints, ManagementAPI, NodeTLS, process_available, provide_broker
from bk_sim.client import Client, ClientEvent, RetryConfig
from bk_sim.errors import BkSimError
from bk_sim.platform import PlatformHandle, start_platform
from bk_sim.tls import CA_ENV_VARS, RunCertificates, make_run_certificates
from tests.integration._platform_support import make_branch

_OK, _WHY = process_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cannot start a RabbitMQ node here: {_WHY}")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> RunCertificates:
    return make_run_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def node(certs: RunCertificates) -> Iterator[BrokerEndpoints]:
    with provide_broker("process", tls=NodeTLS(certs.ca, certs.cert, certs.key)) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def platform(
    node: BrokerEndpoints, certs: RunCertificates, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlatformHandle]:
    assert node.amqp_url and node.management_url
    handle = start_platform(
        tmp_path_factory.mktemp("platform"),
        amqp_url=node.amqp_url,
        management_url=node.management_url,
        tls_cert=certs.cert,
        tls_key=certs.key,
        tls_ca=certs.ca,
    )
    yield handle
    handle.stop()


@pytest.fixture
def trust(monkeypatch: pytest.MonkeyPatch) -> Any:
    def use(ca: Path) -> None:
        for name in CA_ENV_VARS:
            monkeypatch.setenv(name, str(ca))
        monkeypatch.delenv("SSL_CERT_DIR", raising=False)  # the run's CA alone

    return use


def test_platform_serves_https_verified_against_the_run_ca(
    platform: PlatformHandle, certs: RunCertificates
) -> None:
    assert platform.url.startswith("https://127.0.0.1:")
    resp = requests.get(platform.url + "/healthz", verify=str(certs.ca), timeout=5)
    assert resp.status_code < 500
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(platform.url + "/healthz", verify=True, timeout=5)


@pytest.mark.parametrize("websocket", [False, True], ids=["amqps", "wss"])
def test_published_client_defaults_work_with_the_run_ca(
    platform: PlatformHandle,
    node: BrokerEndpoints,
    certs: RunCertificates,
    trust: Any,
    tmp_path: Path,
    websocket: bool,
) -> None:
    assert node.amqps_url is not None
    if not node.amqps_url.endswith(":5671/"):
        pytest.skip("port 5671 was taken: the node's AMQPS listener is elsewhere")
    trust(certs.ca)
    with make_branch(platform, 1) as b:
        # The published client's defaults: ssl=True, rbmq_ssl=True, rbmq_port=5671.
        with Client(
            b.leaves[0],
            host=platform.url,
            rbmq_host="127.0.0.1",
            use_websocket=websocket,
            output_dir=tmp_path,
        ) as client:
            assert client.run_status == "start"  # HTTPS verified against the run's CA
            deadline = time.monotonic() + 20
            while not client.notifications_connected and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.notifications_connected  # WSS / AMQPS verified against the run's CA
            if not websocket:
                api = ManagementAPI(str(node.management_url))
                connections: list[dict[str, Any]] = []
                try:  # the management API lists a connection within its 5 s stats tick
                    while not connections and time.monotonic() < deadline + 10:
                        connections = api.connections(b.leaves[0]["id"])
                        time.sleep(0.5)
                finally:
                    api.close()
                assert connections and connections[0]["ssl"] is True
                assert connections[0]["port"] == 5671


def test_wrong_ca_fails_fast_with_a_certificate_error(
    platform: PlatformHandle, trust: Any, tmp_path: Path
) -> None:
    other = make_run_certificates(tmp_path / "other")  # a CA that signed nothing here
    trust(other.ca)
    events: list[ClientEvent] = []

    class Observer:
        def on_event(self, event: ClientEvent) -> None:
            events.append(event)

    with make_branch(platform, 1) as b:
        t0 = time.monotonic()
        with pytest.raises(BkSimError) as info:
            Client(
                b.leaves[0],
                host=platform.url,
                rbmq_host="127.0.0.1",
                retry_config=RetryConfig(max_retries=5, backoff_factor=1.0, total_timeout=10),
                observer=Observer(),
                output_dir=tmp_path,
            )
        took = time.monotonic() - t0
    message = str(info.value).lower()
    assert "certificate" in message, message
    assert took < 5.0  # no 1 + 2 + 4 + 8 + 16 s of retries
    assert not [e for e in events if e.kind == "retry_wait"]
    assert os.environ["SSL_CERT_FILE"] == str(other.ca)


def test_serve_refuses_half_or_unreadable_tls_settings(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bk_sim.cli import main

    runner = CliRunner()
    base = ["platform", "serve", "--admin-token", "t", "--no-amqp", "--port", "0"]
    base += ["--data-dir", str(tmp_path / "d")]
    half = runner.invoke(main, [*base, "--tls-cert", str(tmp_path / "c.pem")])
    assert half.exit_code == 2
    assert "give both --tls-cert and --tls-key" in half.output
    certs = make_run_certificates(tmp_path / "tls")
    bad = runner.invoke(main, [*base, "--tls-cert", str(certs.cert), "--tls-key", str(certs.ca)])
    assert bad.exit_code == 2
    assert f"cannot load the TLS certificate {certs.cert}" in bad.output
    assert "Traceback" not in bad.output
