"""Broker provider logic that needs no service: URLs, choices, capacity arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

import bk_sim.broker
from bk_sim.broker import BrokerEndpoints, provide_broker, restart_broker
from bk_sim.broker import _provider as provider_mod
from bk_sim.errors import BrokerError


def test_public_surface_is_pinned() -> None:
    assert bk_sim.broker.__all__ == [
        "DEFAULT_MANAGEMENT_URL",
        "ENV_AMQP_URL",
        "ENV_MANAGEMENT_URL",
        "PROVIDERS",
        "BrokerEndpoints",
        "ManagementAPI",
        "NodeTLS",
        "check_socket_capacity",
        "docker_available",
        "process_available",
        "provide_broker",
        "restart_broker",
    ]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", ("127.0.0.1", 5672)),
        ("amqp://u:p@broker.example:5700/vh", ("broker.example", 5700)),
        ("amqp://u:p@broker.example/", ("broker.example", 5672)),
        ("amqps://u:p@broker.example/", ("broker.example", 5671)),
    ],
)
def test_amqp_host_port(url: str, expected: tuple[str, int]) -> None:
    assert BrokerEndpoints("external", url, None, "r").amqp_host_port() == expected


def test_amqp_host_port_without_broker_says_why() -> None:
    with pytest.raises(BrokerError, match="WebSocket"):
        BrokerEndpoints("none", None, None, "r").amqp_host_port()


def test_bad_ports_name_both_urls_instead_of_a_value_error() -> None:
    with pytest.raises(BrokerError) as info:
        with provide_broker(
            "external",
            amqp_url="amqp://u:s3cret@127.0.0.1:x/",
            management_url="http://u:s3cret@127.0.0.1:99999/",
        ):
            pass
    message = str(info.value)
    assert "AMQP check failed: URL 'amqp://u:***@127.0.0.1:x/' is wrong: Port" in message
    assert "management API check failed: URL 'http://u:***@127.0.0.1:99999/' is wrong" in message
    assert "s3cret" not in message


def test_endpoints_equality_ignores_the_container_handle() -> None:
    a = BrokerEndpoints("local", "amqp://a/", "http://a/", "r")
    assert a == BrokerEndpoints("local", "amqp://a/", "http://a/", "r", False, None)
    assert "_container" not in repr(a)


def test_none_provider_yields_no_urls_and_a_reason() -> None:
    with provide_broker("none") as endpoints:
        assert endpoints.provider == "none"
        assert endpoints.amqp_url is None and endpoints.management_url is None
        assert "WebSocket" in endpoints.reason
        assert endpoints.restartable is False


def test_unknown_provider_lists_the_choices() -> None:
    with pytest.raises(BrokerError, match="choose one of auto, external, local"):
        with provide_broker("rabbit"):
            pass


def test_external_without_urls_says_how_to_give_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BK_SIM_AMQP_URL", raising=False)
    monkeypatch.delenv("BK_SIM_MANAGEMENT_URL", raising=False)
    with pytest.raises(BrokerError, match="--amqp-url.*BK_SIM_AMQP_URL"):
        with provide_broker("external"):
            pass


@pytest.mark.parametrize("provider", ["local", "testcontainers", "none"])
def test_urls_with_a_provider_that_ignores_them_is_an_error(provider: str) -> None:
    with pytest.raises(BrokerError, match="does not take URLs"):
        with provide_broker(provider, amqp_url="amqp://guest:guest@127.0.0.1:5672/"):
            pass


def test_wrong_url_schemes_name_both_endpoints_before_connecting() -> None:
    with pytest.raises(BrokerError) as info:
        with provide_broker(
            "external", amqp_url="http://u:pw@127.0.0.1:5672/", management_url="amqp://h/"
        ):
            pass
    message = str(info.value)
    assert "AMQP check failed: URL" in message and "expected amqp://" in message
    assert "management API check failed: URL" in message and "expected http://" in message
    assert "pw" not in message  # the password is masked


def test_a_missing_url_is_derived_from_the_other(monkeypatch: pytest.MonkeyPatch) -> None:
    amqp, mgmt, source = provider_mod._configured("amqp://bob:pw@broker.example:5700/vh", None)
    assert amqp == "amqp://bob:pw@broker.example:5700/vh"
    assert mgmt == "http://bob:pw@broker.example:15672/"
    assert "derived" in source
    monkeypatch.setenv("BK_SIM_MANAGEMENT_URL", "http://bob:pw@broker.example:15000/")
    monkeypatch.delenv("BK_SIM_AMQP_URL", raising=False)
    amqp, mgmt, source = provider_mod._configured(None, None)
    assert amqp == "amqp://bob:pw@broker.example:5672/"
    assert mgmt == "http://bob:pw@broker.example:15000/"
    assert source.startswith("from the environment")


def test_restart_of_a_broker_bk_sim_did_not_start_is_refused() -> None:
    endpoints = BrokerEndpoints("local", "amqp://a/", "http://a/", "r", restartable=True)
    with pytest.raises(BrokerError, match="only a process or testcontainers broker"):
        restart_broker(endpoints)


def _node(**fields: object) -> dict[str, object]:
    return {"name": "rabbit@n1", "running": True, **fields}


def test_capacity_uses_sockets_total_with_a_margin() -> None:
    nodes = [_node(sockets_total=832, sockets_used=3, fd_total=1024)]
    # 700 + max(50, 70) = 770 fits in 832; 760 + 76 = 836 does not.
    assert provider_mod.capacity_problem(nodes, 700) is None
    problem = provider_mod.capacity_problem(nodes, 760)
    assert problem is not None
    assert "832 sockets (sockets_total, 3 in use)" in problem
    assert "760 connections + 76 margin = 836" in problem
    assert 'su rabbitmq -s /bin/sh -c "ulimit -n 20000; rabbitmq-server -detached"' in problem


def test_capacity_falls_back_to_fd_total_and_sizes_the_advice() -> None:
    nodes = [_node(fd_total=1024, fd_used=40)]
    problem = provider_mod.capacity_problem(nodes, 30000)
    assert problem is not None and "1024 sockets (fd_total, 40 in use)" in problem
    # 33000 needed * 1.25 = 41250, rounded up to the next thousand.
    assert "ulimit -n 42000" in problem


def test_capacity_skips_stopped_nodes_and_advises_docker_for_containers() -> None:
    nodes = [_node(running=False, sockets_total=10), _node(sockets_total=100)]
    problem = provider_mod.capacity_problem(nodes, 500, provider="testcontainers")
    assert problem is not None and "allows 100 sockets" in problem
    assert "--ulimit nofile=20000:20000" in problem
    assert provider_mod.capacity_problem([_node()], 10**6) is None  # nothing reported


class _StandInContainer:
    """The slice of testcontainers' DockerContainer that RabbitContainer drives.

    No Docker engine here: this stands in for it so the start / retry / restart / cleanup
    logic runs; the real thing is exercised by tests/integration/test_broker_testcontainers.py.
    """

    def __init__(self, start_error: str | None = None, port_after_restart: int = 0) -> None:
        self.ports: dict[str, object] = {"5672": None, "15672": None}
        self.start_error = start_error
        self.port_after_restart = port_after_restart
        self.restarts = 0
        self.stops = 0

    def start(self) -> None:
        if self.start_error:
            raise RuntimeError(self.start_error)

    def stop(self) -> None:
        self.stops += 1

    def get_docker_client(self) -> _StandInContainer:
        return self

    def host(self) -> str:
        return "localhost"

    def get_container_host_ip(self) -> str:
        return "localhost"

    def get_container_id(self) -> str:
        return "0123456789abcdef"

    def get_exposed_port(self, port: int) -> int:
        bound = self.ports[str(port)]
        if isinstance(bound, tuple):
            return int(bound[1])
        return port + 30000 + (self.port_after_restart if self.restarts else 0)

    def get_wrapped_container(self) -> _StandInContainer:
        return self

    def restart(self, timeout: int) -> None:
        self.restarts += 1


@pytest.fixture()
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    from bk_sim.broker import _testcontainer

    monkeypatch.setattr(_testcontainer, "READY_POLL_S", 0.01)


def test_container_start_binds_loopback_ports_and_waits_until_ready(
    monkeypatch: pytest.MonkeyPatch, fast_polls: None
) -> None:
    from bk_sim.broker import _testcontainer

    built: list[_StandInContainer] = [
        _StandInContainer(start_error="Bind for 127.0.0.1:40000 failed: port is already allocated"),
        _StandInContainer(),
    ]
    monkeypatch.setattr(_testcontainer, "_build", lambda image: built.pop(0))
    monkeypatch.setattr(_testcontainer, "_inside_container", lambda: False)
    calls: list[tuple[str, str]] = []

    def ready(amqp_url: str, management_url: str) -> None:
        calls.append((amqp_url, management_url))
        if len(calls) < 3:
            raise BrokerError("not yet")

    handle = _testcontainer.RabbitContainer.start(ready)
    container = handle._container
    assert not built  # the port clash was retried with a fresh container
    amqp = container.ports["5672"]
    assert isinstance(amqp, tuple) and amqp[0] == "127.0.0.1"
    assert handle.amqp_url == f"amqp://guest:guest@127.0.0.1:{amqp[1]}/"
    assert handle._stable_ports and len(calls) == 3

    handle.restart()
    assert container.restarts == 1 and handle.amqp_url.endswith(f":{amqp[1]}/")  # same URL
    handle.stop()
    assert container.stops == 1


def test_container_that_never_gets_ready_is_removed(
    monkeypatch: pytest.MonkeyPatch, fast_polls: None
) -> None:
    from bk_sim.broker import _testcontainer

    container = _StandInContainer()
    monkeypatch.setattr(_testcontainer, "_build", lambda image: container)

    def never(amqp_url: str, management_url: str) -> None:
        raise BrokerError("AMQP check failed: nothing is listening")

    with pytest.raises(BrokerError, match="did not answer within 0.05s: AMQP check failed"):
        _testcontainer.RabbitContainer.start(never, timeout=0.05)
    assert container.stops == 1


def test_restart_rereads_ports_docker_moved(fast_polls: None) -> None:
    from bk_sim.broker import _testcontainer

    container = _StandInContainer(port_after_restart=7)
    handle = _testcontainer.RabbitContainer(container, stable_ports=False, ready=lambda a, m: None)
    handle._read_ports()
    assert handle.amqp_port == 35672
    endpoints = BrokerEndpoints(
        "testcontainers", handle.amqp_url, handle.management_url, "r", True, handle
    )
    after = restart_broker(endpoints)
    assert after.amqp_url == "amqp://guest:guest@127.0.0.1:35679/"
    assert after.management_url == "http://guest:guest@127.0.0.1:45679/"
    assert after.reason == "r" and after.restartable


def test_auto_with_restarts_and_no_installation_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BK_SIM_AMQP_URL", raising=False)
    monkeypatch.delenv("BK_SIM_MANAGEMENT_URL", raising=False)
    monkeypatch.setattr(
        "bk_sim.broker._process.process_available",
        lambda: (False, "no RabbitMQ installation: rabbitmq-server is not installed"),
    )
    monkeypatch.setattr(
        "bk_sim.broker._testcontainer.docker_available", lambda: (False, "no Docker socket")
    )
    with pytest.raises(BrokerError) as info:
        with provide_broker("auto", needs_restart=True):
            pass
    message = str(info.value)
    assert "the run restarts its broker" in message
    assert "rabbitmq-server is not installed" in message
    assert "no Docker socket" in message


def test_tls_needs_an_own_node() -> None:
    tls = bk_sim.broker.NodeTLS(*(Path("/nonexistent"),) * 3)
    with pytest.raises(BrokerError, match="TLS needs bk-sim's own broker node"):
        with provide_broker("local", tls=tls):
            pass


def test_own_node_ports_avoid_the_ephemeral_range() -> None:
    # An outgoing connection may take any ephemeral port while a node restarts.
    from bk_sim.broker._process import FIXED_PORT_MIN, _ephemeral_range, free_ports

    low, _ = _ephemeral_range()
    ports = free_ports(5)
    assert len(set(ports)) == 5
    if low > FIXED_PORT_MIN + 100:
        assert all(FIXED_PORT_MIN <= p < low for p in ports)
