"""docker-compose.yml and the Dockerfile agree with each other and with the platform CLI.

A drift here means ``docker compose up`` starts a platform that cannot reach its broker,
or an image whose command is not the one the compose file documents.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _interpolate(text: str) -> str:
    """Compose's ``${VAR:-default}`` with the defaults (what an unset environment gets)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def serve() -> click.Command:
    # No skip: the platform CLI exists, and a broken import must fail these checks.
    from bk_sim.cli._platform import platform

    command = platform.commands.get("serve")
    assert command is not None, "bk-sim platform has no serve command"
    return command


def _options(command: click.Command) -> dict[str, click.Option]:
    return {
        opt: param
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
    }


def _args(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs of ``bk-sim platform serve ...``."""
    assert argv[:3] == ["bk-sim", "platform", "serve"], argv
    rest = argv[3:]
    assert len(rest) % 2 == 0 and all(a.startswith("--") for a in rest[::2]), rest
    return dict(zip(rest[::2], rest[1::2], strict=True))


def _published(service: dict[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host ip, host port)."""
    out = {}
    for spec in service["ports"]:
        ip, host_port, container_port = _interpolate(str(spec)).rsplit(":", 2)
        out[int(container_port)] = (ip, int(host_port))
    return out


def _dockerfile_cmd() -> list[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    cmds = [line for line in lines if line.startswith("CMD ")]
    assert len(cmds) == 1, cmds
    argv: list[str] = json.loads(cmds[0][len("CMD ") :])
    return argv


def test_rabbitmq_service(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]
    assert rabbit["image"] == "rabbitmq:3-management"
    assert _published(rabbit) == {5672: ("127.0.0.1", 5672), 15672: ("127.0.0.1", 15672)}
    env = rabbit["environment"]
    assert (env["RABBITMQ_DEFAULT_USER"], env["RABBITMQ_DEFAULT_PASS"]) == ("guest", "guest")
    assert "loopback_users []" in env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]
    assert rabbit["healthcheck"]["test"] == ["CMD", "rabbitmq-diagnostics", "-q", "ping"]
    assert rabbit["ulimits"]["nofile"]["soft"] >= 20000


def test_platform_service(compose: dict[str, Any]) -> None:
    platform = compose["services"]["platform"]
    assert platform["build"] == "."
    assert platform["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert "http://127.0.0.1:8080/healthz" in " ".join(platform["healthcheck"]["test"])
    assert _published(platform) == {8080: ("127.0.0.1", 8080)}
    assert "BK_SIM_ADMIN_TOKEN" in platform["environment"]
    assert "/data" in " ".join(platform["volumes"])


def test_dockerfile_cmd_is_the_compose_command(compose: dict[str, Any]) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "\nFROM python:3.11-slim\n" in dockerfile
    assert "pip install ." in dockerfile
    assert _dockerfile_cmd() == compose["services"]["platform"]["command"]


def test_command_agrees_with_the_cli_defaults(
    compose: dict[str, Any], serve: click.Command
) -> None:
    options = _options(serve)
    args = _args(compose["services"]["platform"]["command"])
    assert set(args) <= set(options), f"options the CLI lacks: {set(args) - set(options)}"
    assert "--admin-token" not in args  # a secret: from the environment only

    # The port the platform listens on is the CLI's default and the one published.
    assert int(args["--port"]) == options["--port"].default == 8080
    assert 8080 in _published(compose["services"]["platform"])
    assert args["--host"] == "0.0.0.0" and options["--host"].default == "127.0.0.1"

    # Broker URLs: the CLI defaults with the host swapped for the compose service name.
    rabbit = compose["services"]["rabbitmq"]
    user = rabbit["environment"]["RABBITMQ_DEFAULT_USER"]
    password = rabbit["environment"]["RABBITMQ_DEFAULT_PASS"]
    for flag in ("--amqp-url", "--rabbitmq-api"):
        ours, default = urlsplit(args[flag]), urlsplit(str(options[flag].default))
        assert ours.hostname == "rabbitmq", flag
        assert (ours.scheme, ours.port, ours.path) == (default.scheme, default.port, default.path)
        assert (ours.username, ours.password) == (default.username, default.password)
        assert (ours.username, ours.password) == (user, password)
        assert ours.port in _published(rabbit)

    # The admin token the compose file sets is the one the CLI reads.
    assert options["--admin-token"].envvar == "BK_SIM_ADMIN_TOKEN"
    assert options["--data-dir"].envvar == "BK_SIM_DATA_DIR"


def test_the_image_command_exists_in_bk_sim(serve: click.Command) -> None:
    from bk_sim.cli import main

    ctx = click.Context(main)
    group = main.get_command(ctx, "platform")
    assert isinstance(group, click.Group), "bk-sim platform is not registered in bk_sim/cli.py"
    assert group.get_command(ctx, "serve") is serve
