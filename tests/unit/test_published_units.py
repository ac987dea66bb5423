"""bk_sim.published without a registry, a broker or a published release: requirement
checks, the env cache listing, settings for the runner, event parsing, the runner's
independence from bk_sim and numpy."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bk_sim.cli import main
from bk_sim.errors import PublishedClientError, ScenarioError
from bk_sim.published import (
    UNOBSERVABLE,
    ConsumerPhase,
    HttpAttempt,
    LeafSettings,
    PublishedEnv,
    Ready,
    Reply,
    Unknown,
    as_client_event,
    default_cache_dir,
    endpoint_of,
    list_envs,
    parse_event,
    parse_requirement,
    prepare,
    runner_script,
    transports_for,
    unobservable,
)

# --------------------------------------------------------------------------- requirements


@pytest.mark.parametrize(
    ("text", "canonical", "dirname"),
    [
        ("branchkey==2.9.0", "branchkey==2.9.0", "branchkey_eq2.9.0"),
        (" branchkey == 3.0.1 ", "branchkey==3.0.1", "branchkey_eq3.0.1"),
        ("Branchkey>=3", "branchkey>=3", "branchkey_ge3"),
        ("branchkey>=3,<4", "branchkey<4,>=3", "branchkey_lt4_ge3"),
        ("branchkey<4, >=3", "branchkey<4,>=3", "branchkey_lt4_ge3"),
        ("branchkey~=2.9", "branchkey~=2.9", "branchkey_compat2.9"),
        ("branchkey==2.9.*", "branchkey==2.9.*", "branchkey_eq2.9.x"),
    ],
)
def test_accepted_requirements_are_canonical(text: str, canonical: str, dirname: str) -> None:
    req = parse_requirement(text)
    assert req.text == canonical and str(req) == canonical
    assert req.dirname == dirname


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("notbranchkey", "names 'notbranchkey'"),
        ("notbranchkey==1.0", "only the 'branchkey' distribution"),
        ("branchkey>=3; rm -rf", "malformed"),
        ("branchkey>=3; python_version>'3'", "environment marker"),
        ("branchkey", "no version specifier"),
        ("branchkey[ws]==2.9.0", "extras"),
        ("branchkey @ https://example.invalid/b.whl", "is a URL"),
        ("", "empty"),
        ("   ", "empty"),
        ("branchkey==2.9.0\nnumpy", "malformed"),
        ("branchkey==2.9.0 numpy==1", "malformed"),
        ("-r requirements.txt", "malformed"),
        ("--index-url=http://x branchkey==2.9.0", "malformed"),
        ("branchkey==" + "9" * 300, "malformed"),
    ],
)
def test_refused_requirements_are_one_line_exit_2(text: str, reason: str) -> None:
    with pytest.raises(PublishedClientError) as info:
        parse_requirement(text)
    assert info.value.exit_code == 2
    assert reason in str(info.value)
    assert "\n" not in str(info.value)


def test_prepare_refuses_before_building(tmp_path: Path) -> None:
    with pytest.raises(PublishedClientError, match="only the 'branchkey' distribution"):
        prepare("notbranchkey==1.0", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_allows_checks_installed_versions() -> None:
    req = parse_requirement("branchkey>=3")
    assert req.allows("3.0.1") and not req.allows("2.9.0") and not req.allows("not-a-version")


def test_transports_by_release() -> None:
    assert transports_for("2.9.0") == ("amqp", "websocket")
    assert transports_for("3.0.1") == ("websocket",)
    assert transports_for("4.0.0rc1") == ("websocket",)


# --------------------------------------------------------------------------- env cache


def _marker(path: Path, requirement: str, branchkey: str, numpy: str) -> None:
    path.mkdir(parents=True)
    data = {
        "requirement": requirement,
        "branchkey_version": branchkey,
        "numpy_version": numpy,
        "python_version": "3.11.7",
        "versions": {"branchkey": branchkey, "numpy": numpy},
        "created_at": "2026-12-02T07:00:00+00:00",
        "build_seconds": 12.5,
    }
    (path / "bk-sim-env.json").write_text(json.dumps(data))
    (path / "payload.bin").write_bytes(b"x" * 1000)


def test_list_envs_shows_complete_envs_only(tmp_path: Path) -> None:
    _marker(tmp_path / "branchkey_eq2.9.0", "branchkey==2.9.0", "2.9.0", "1.26.4")
    (tmp_path / "branchkey_eq3.0.1").mkdir()  # a crashed build: no marker
    (tmp_path / "branchkey_eq3.0.0").mkdir()
    (tmp_path / "branchkey_eq3.0.0" / "bk-sim-env.json").write_text("{not json")
    envs = list_envs(tmp_path)
    assert [e.requirement for e in envs] == ["branchkey==2.9.0"]
    env = envs[0]
    assert env.implementation == "branchkey==2.9.0" and env.numpy_version == "1.26.4"
    assert env.python == tmp_path / "branchkey_eq2.9.0" / "bin" / "python"
    assert env.size_bytes() >= 1000
    assert list_envs(tmp_path / "absent") == []


def test_check_transport_names_transport_and_release(tmp_path: Path) -> None:
    _marker(tmp_path / "b", "branchkey>=3", "3.0.1", "2.4.6")
    [env] = list_envs(tmp_path)
    env.check_transport("websocket")
    with pytest.raises(ScenarioError) as info:
        env.check_transport("amqp")
    assert "'amqp'" in str(info.value) and "branchkey==3.0.1" in str(info.value)
    assert "branchkey>=3" in str(info.value)


def test_cache_dir_follows_env_vars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BK_SIM_CLIENTS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "bk-sim" / "clients"
    monkeypatch.setenv("BK_SIM_CLIENTS_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_clients_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = runner.invoke(main, ["clients", "list", "--cache-dir", str(tmp_path)])
    assert empty.exit_code == 0 and "no published client envs cached" in empty.output
    _marker(tmp_path / "branchkey_eq2.9.0", "branchkey==2.9.0", "2.9.0", "1.26.4")
    table = runner.invoke(main, ["clients", "list", "--cache-dir", str(tmp_path)])
    assert table.exit_code == 0
    assert "branchkey==2.9.0" in table.output and "1.26.4" in table.output
    as_json = runner.invoke(main, ["clients", "list", "--json", "--cache-dir", str(tmp_path)])
    [row] = json.loads(as_json.output)
    assert row["numpy_version"] == "1.26.4" and row["size_bytes"] >= 1000
    bad = runner.invoke(main, ["clients", "prepare", "notbranchkey", "--cache-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "notbranchkey" in bad.output, bad.output


# --------------------------------------------------------------------------- settings


def test_settings_for_amqp_from_a_broker_url() -> None:
    settings = LeafSettings.for_broker(
        "http://127.0.0.1:8080/", "amqp://guest:secret@127.0.0.1:5672/", reconnect_max_attempts=3
    )
    command = settings.to_command()
    assert command["transport"] == "amqp"
    assert command["api"] == {"host": "http://127.0.0.1:8080", "ssl": False}
    assert command["rabbitmq"] == {
        "host": "127.0.0.1",
        "port": 5672,
        "ssl": False,
        "max_reconnect_attempts": 3,
    }
    assert "secret" not in json.dumps(command)  # leaves log in with their own credentials
    tls = LeafSettings.for_broker("https://p.example", "amqps://h.example/").to_command()
    assert tls["rabbitmq"]["port"] == 5671 and tls["rabbitmq"]["ssl"] is True
    assert tls["api"]["ssl"] is True


def test_settings_for_websocket() -> None:
    command = LeafSettings(
        host="http://127.0.0.1:1",
        transport="websocket",
        reconnect_backoff_factor=1.5,
        retry={"max_retries": 5, "status_forcelist": (503,)},
        wait_for_run=True,
    ).to_command()
    assert "rabbitmq" not in command
    assert command["websocket"] == {"reconnect_backoff_factor": 1.5}
    assert command["retry"] == {"max_retries": 5, "status_forcelist": [503]}
    assert command["run"] == {"wait_for_run": True}
    with pytest.raises(PublishedClientError, match="unknown transport 'grpc'"):
        LeafSettings(host="http://h", transport="grpc").to_command()


# --------------------------------------------------------------------------- events


def test_events_parse_into_their_classes() -> None:
    ready = parse_event(
        json.dumps(
            {
                "event": "ready",
                "t": 1.5,
                "leaf": None,
                "protocol": 1,
                "pid": 42,
                "python": "3.11.7",
                "branchkey": "2.9.0",
                "numpy": "1.26.4",
                "transports": ["amqp", "websocket"],
                "unobserved": [{"what": "x", "why": "y"}],
                "added_later": True,
            }
        )
    )
    assert isinstance(ready, Ready) and ready.transports == ("amqp", "websocket")
    assert ready.kind == "ready" and ready.to_dict()["transports"] == ["amqp", "websocket"]
    reply = parse_event('{"event":"reply","t":2,"leaf":"L0","id":"c1","cmd":"upload","ok":true}')
    assert isinstance(reply, Reply) and reply.ok and reply.leaf == "L0" and reply.result is None
    attempt = parse_event(
        '{"event":"http_attempt","t":3,"leaf":"L1","method":"POST","url":"u","status":503}'
    )
    assert isinstance(attempt, HttpAttempt) and attempt.status == 503
    phase = parse_event(
        '{"event":"consumer","t":4,"leaf":"L0","phase":"reconnect_wait","message":"m",'
        '"attempt":2,"delay_s":4.0}'
    )
    assert isinstance(phase, ConsumerPhase) and phase.delay_s == 4.0


def test_unknown_or_incomplete_events_are_kept() -> None:
    new = parse_event('{"event":"from_the_future","t":1,"leaf":"L0","x":1}')
    assert isinstance(new, Unknown) and new.event == "from_the_future" and new.raw["x"] == 1
    partial = parse_event('{"event":"reply","t":1,"leaf":null}')
    assert isinstance(partial, Unknown) and partial.event == "reply"
    with pytest.raises(ValueError):
        parse_event("[1, 2]")
    with pytest.raises(ValueError):
        parse_event("not json")


def test_unobservable_is_data_for_results() -> None:
    amqp = unobservable("amqp", runtime=[{"what": "parallel_downloads", "why": "w"}])
    whats = [u["what"] for u in amqp]
    assert "amqp_heartbeats" in whats and "ws_frames" not in whats
    assert whats[-1] == "parallel_downloads"
    assert all(set(u) >= {"what", "why"} for u in amqp)
    json.dumps(amqp)
    assert {u.what for u in UNOBSERVABLE} == {u["what"] for u in unobservable()}


# --------------------------------------------------------------------------- the runner


def test_runner_script_imports_neither_bk_sim_nor_numpy() -> None:
    """It runs with the env's python and numpy: the harness's arrays never pass through it."""
    tree = ast.parse(runner_script().read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "bk_sim" not in imported and "numpy" not in imported and "branchkey" not in imported
    # The standard library only: the env holds branchkey's dependencies, nothing of ours.
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_env_dataclass_round_trips_to_json(tmp_path: Path) -> None:
    _marker(tmp_path / "e", "branchkey==2.9.0", "2.9.0", "1.26.4")
    [env] = list_envs(tmp_path)
    assert isinstance(env, PublishedEnv)
    data = json.loads(json.dumps(env.to_dict()))
    assert data["implementation"] == "branchkey==2.9.0" and data["transports"] == [
        "amqp",
        "websocket",
    ]


# --------------------------------------------------------------------------- vocabulary


def test_endpoints_use_the_client_route_names() -> None:
    base = "http://127.0.0.1:1"
    assert endpoint_of(f"{base}/api/v1/file/upload") == "upload"
    assert endpoint_of(f"{base}/api/v1/file/download/abc") == "download_url"
    assert endpoint_of(f"{base}/files/abc") == "download"
    assert endpoint_of(f"{base}/api/v1/run/b") == "run"
    assert endpoint_of(f"{base}/api/v1/ws/ticket") == "ws_ticket"
    assert endpoint_of(None) is None


def test_runner_events_map_onto_client_event_kinds() -> None:
    def mapped(line: str) -> dict[str, object] | None:
        return as_client_event(parse_event(line), leaf_id="leaf-1", transport="amqp", leaf=3)

    attempt = mapped(
        '{"event":"http_attempt","t":1,"leaf":"L0","method":"POST",'
        '"url":"http://h:1/api/v1/file/upload","status":503,"attempt":1}'
    )
    assert attempt == {
        "t": 1.0,
        "leaf_id": "leaf-1",
        "leaf": 3,
        "kind": "http_request",
        "transport": "http",
        "method": "POST",
        "endpoint": "upload",
        "status": 503,
        "attempt": 1,
    }
    wait = mapped('{"event":"http_retry_wait","t":1,"leaf":"L0","url":null,"seconds":0.0}')
    assert wait is not None and wait["kind"] == "retry_wait" and wait["delay_s"] == 0.0
    note = mapped('{"event":"notification","t":1,"leaf":"L0","aggregation_id":"a1"}')
    assert note is not None and (note["kind"], note["value"]) == ("notification", "a1")
    assert note["message_type"] == "aggregation_status" and note["transport"] == "amqp"
    status = mapped('{"event":"run_status","t":1,"leaf":"L0","run_status":"stop"}')
    assert status is not None and (status["message_type"], status["value"]) == (
        "run_status",
        "stop",
    )
    lost = mapped('{"event":"consumer","t":1,"leaf":"L0","phase":"connection_lost","message":"m"}')
    assert lost is not None and lost["kind"] == "disconnect"
    backoff = mapped(
        '{"event":"consumer","t":1,"leaf":"L0","phase":"reconnect_wait","message":"m",'
        '"attempt":2,"delay_s":4.0}'
    )
    assert backoff is not None and (backoff["kind"], backoff["attempt"], backoff["delay_s"]) == (
        "reconnect_wait",
        2,
        4.0,
    )
    blocked = mapped(
        '{"event":"notification_blocked","t":1,"leaf":"L0","aggregation_id":"a","blocked_s":2.5}'
    )
    assert blocked is not None and blocked["kind"] == "published_notification_blocked"
    assert blocked["blocked_s"] == 2.5 and blocked["leaf"] == 3
    assert mapped('{"event":"reply","t":1,"leaf":"L0","id":"c1","cmd":"x","ok":true}') is None
