"""The published branchkey client as a leaf: real envs from the registry, the real
reference platform on loopback, the real RabbitMQ, the runner as a real process.

The envs are built once per test session (and reused from the cache across sessions);
a test skips, saying why, only when the package registry cannot be reached.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from bk_sim.broker import ManagementAPI
from bk_sim.errors import PublishedClientError, ScenarioError
from bk_sim.platform import PlatformHandle, start_platform
from bk_sim.published import (
    ConsumerPhase,
    ConsumerStopped,
    HttpAttempt,
    HttpRequest,
    HttpRetryWait,
    LeafSettings,
    Notification,
    NotificationBlocked,
    NotificationDropped,
    Printed,
    PublishedEnv,
    PublishedLeafProcess,
    Reply,
    list_envs,
    prepare,
)
from bk_sim.weights import read_layers, save_weights

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _env_or_skip(requirement: str) -> PublishedEnv:
    try:
        return prepare(requirement)
    except PublishedClientError as exc:
        if "could not be reached" in str(exc):
            pytest.skip(f"package registry unreachable, cannot build {requirement}: {exc}")
        raise


@pytest.fixture(scope="session")
def env_290() -> PublishedEnv:
    return _env_or_skip("branchkey==2.9.0")


@pytest.fixture(scope="session")
def env_301() -> PublishedEnv:
    return _env_or_skip("branchkey==3.0.1")


@pytest.fixture(scope="module")
def published_platform(
    management: ManagementAPI, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlatformHandle]:
    handle = start_platform(tmp_path_factory.mktemp("published-platform"), amqp_url=AMQP_URL)
    yield handle
    handle.stop()


@dataclass
class _Branch:
    handle: PlatformHandle
    branch_id: str
    leaves: list[dict[str, str]]


@contextmanager
def _branch(handle: PlatformHandle, leaves: int) -> Iterator[_Branch]:
    admin = handle.admin
    tree_id = admin.create_tree(f"published-{uuid.uuid4().hex[:10]}")
    try:
        branch = admin.create_branch(tree_id, "b")
        creds = admin.create_leaves(branch["branch_id"], leaves)
        admin.set_run_status(branch["branch_id"], "start")
        yield _Branch(handle, branch["branch_id"], creds)
    finally:
        admin.delete_tree(tree_id)


def _models(seed: int, count: int) -> list[list[np.ndarray]]:
    """What the harness uploads: one float64 and one float32 layer per leaf."""
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal((4, 3)), rng.standard_normal(5).astype(np.float32)]
        for _ in range(count)
    ]


def _weighted_average(
    weightings: Sequence[float], models: Sequence[Sequence[np.ndarray]]
) -> list[np.ndarray]:
    """The reference, with the harness's numpy, accumulated in float64."""
    w = np.asarray(weightings, dtype=np.float64)
    out = []
    for k in range(len(models[0])):
        stack = np.stack([np.asarray(m[k], dtype=np.float64) for m in models])
        out.append(np.tensordot(w, stack, axes=1) / w.sum())
    return out


def _play_round(
    runner: PublishedLeafProcess,
    branch: _Branch,
    settings: LeafSettings,
    workdir: Path,
    weightings: Sequence[float],
) -> tuple[list[Reply], list[list[np.ndarray]]]:
    models = _models(seed=7, count=len(branch.leaves))
    for i, creds in enumerate(branch.leaves):
        reply = runner.start_leaf(f"L{i}", creds, settings)
        assert reply.ok, reply.error
    ids = []
    for i, (weighting, model) in enumerate(zip(weightings, models, strict=True)):
        path = save_weights(workdir / f"upload-{i}.npz", weighting, model)
        ids.append(runner.send_round(f"L{i}", path, notification_timeout_s=30))
    replies = [runner.wait_reply(request_id, timeout_s=120) for request_id in ids]
    for reply in replies:
        assert reply.ok, f"{reply.stage}: {reply.error}"
    return replies, models


def _assert_aggregate(
    replies: Sequence[Reply], weightings: Sequence[float], models: Sequence[Sequence[np.ndarray]]
) -> None:
    expected = _weighted_average(weightings, models)
    aggregation_ids = {r.result["wait_notification"]["aggregation_id"] for r in replies if r.result}
    assert len(aggregation_ids) == 1, aggregation_ids
    for reply in replies:
        assert reply.result is not None
        layers = read_layers(Path(reply.result["download"]["path"]))
        assert len(layers) == 2
        assert layers[0].dtype == np.float64 and layers[1].dtype == np.float32
        np.testing.assert_allclose(layers[0], expected[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(layers[1], expected[1].astype(np.float32), rtol=1e-6)


def _assert_observed(runner: PublishedLeafProcess, replies: Sequence[Reply], leaves: int) -> None:
    for i in range(leaves):
        leaf = f"L{i}"
        uploads = [
            e
            for e in runner.events(HttpAttempt)
            if isinstance(e, HttpAttempt) and e.leaf == leaf and e.url.endswith("/file/upload")
        ]
        assert [(u.method, u.status) for u in uploads] == [("POST", 201)]
        calls = [e for e in runner.events(HttpRequest) if e.leaf == leaf]
        assert {"GET", "POST"} <= {c.method for c in calls if isinstance(c, HttpRequest)}
        reply = replies[i]
        assert reply.result is not None
        got = reply.result["wait_notification"]["aggregation_id"]
        notes = [e for e in runner.events(Notification) if e.leaf == leaf]
        assert [n.aggregation_id for n in notes if isinstance(n, Notification)] == [got]


def test_2_9_0_plays_a_round_over_amqp(
    env_290: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    # 2.9.0 pins numpy 1.26.4; the harness writes and reads every array with its own.
    assert env_290.numpy_version == "1.26.4"
    assert np.__version__ != env_290.numpy_version
    weightings = [3.0, 1.0]
    settings = LeafSettings.for_broker(published_platform.url, AMQP_URL, transport="amqp")
    with (
        _branch(published_platform, 2) as branch,
        PublishedLeafProcess(env_290, tmp_path / "runner") as runner,
    ):
        assert runner.ready.branchkey == "2.9.0" and runner.ready.numpy == "1.26.4"
        assert runner.ready.transports == ("amqp", "websocket")
        replies, models = _play_round(runner, branch, settings, tmp_path, weightings)
        _assert_aggregate(replies, weightings, models)
        _assert_observed(runner, replies, leaves=2)
        assert all(
            r.result and r.result.get("transport") == "amqp"
            for r in runner.events(Reply)
            if isinstance(r, Reply) and r.cmd == "start_leaf"
        )


def test_3_0_1_plays_a_round_over_websocket(
    env_301: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    weightings = [1.0, 5.0]
    settings = LeafSettings(host=published_platform.url, transport="websocket")
    with (
        _branch(published_platform, 2) as branch,
        PublishedLeafProcess(env_301, tmp_path / "runner") as runner,
    ):
        assert runner.ready.branchkey == "3.0.1"
        assert runner.ready.transports == ("websocket",)
        replies, models = _play_round(runner, branch, settings, tmp_path, weightings)
        _assert_aggregate(replies, weightings, models)
        _assert_observed(runner, replies, leaves=2)
        # A stopped leaf can be started again in the same runner (a chaos restart).
        stopped = runner.stop_leaf("L0")
        assert stopped.ok and stopped.result == {"closed": True, "consumer_alive": False}
        assert runner.start_leaf("L0", branch.leaves[0], settings).ok


@pytest.fixture(params=["branchkey==2.9.0", "branchkey==3.0.1"])
def any_env(request: pytest.FixtureRequest) -> PublishedEnv:
    """Each release, for behaviour they share (both over WebSocket)."""
    fixture = {"branchkey==2.9.0": "env_290", "branchkey==3.0.1": "env_301"}[request.param]
    env: PublishedEnv = request.getfixturevalue(fixture)
    return env


def test_retries_and_their_waits_are_observed(
    any_env: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    """Two 503s on the upload: three attempts, and urllib3's real schedule (0 s, then
    2 s for backoff_factor 1.0), not the documented 1 s, 2 s."""
    settings = LeafSettings(host=published_platform.url, transport="websocket")
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(any_env, tmp_path / "runner") as runner,
    ):
        assert runner.start_leaf("L0", branch.leaves[0], settings).ok
        published_platform.admin.set_faults(
            branch.branch_id, {"http": [{"endpoint": "upload", "status": 503, "count": 2}]}
        )
        path = save_weights(tmp_path / "w.npz", 1.0, _models(1, 1)[0])
        reply = runner.upload("L0", path)
        assert reply.ok, reply.error
        attempts = [
            e
            for e in runner.events(HttpAttempt)
            if isinstance(e, HttpAttempt) and e.url.endswith("/file/upload")
        ]
        assert [(a.status, a.attempt) for a in attempts] == [(503, 1), (503, 2), (201, 3)]
        [call] = [
            e
            for e in runner.events(HttpRequest)
            if isinstance(e, HttpRequest) and e.url.endswith("/file/upload")
        ]
        assert call.attempts == 3 and call.status == 201
        waits = [e.seconds for e in runner.events(HttpRetryWait) if isinstance(e, HttpRetryWait)]
        assert len(waits) == 2
        assert waits[0] < 0.5 <= 1.5 <= waits[1]


def test_amqp_is_refused_on_3_x_naming_transport_and_release(
    env_301: PublishedEnv, tmp_path: Path
) -> None:
    with pytest.raises(ScenarioError, match=r"'amqp'.*branchkey==3\.0\.1"):
        env_301.check_transport("amqp")
    creds = {k: "x" for k in ("id", "name", "session_token", "tree_id", "branch_id", "owner_id")}
    with PublishedLeafProcess(env_301, tmp_path / "runner") as runner:
        reply = runner.start_leaf(
            "L0", creds, LeafSettings(host="http://127.0.0.1:9", transport="amqp")
        )
        assert not reply.ok
        assert reply.error is not None
        assert "'amqp'" in reply.error and "branchkey==3.0.1" in reply.error
        # A leaf whose client could not be built can be started again (here: no platform).
        retry = LeafSettings(
            host="http://127.0.0.1:9", transport="websocket", retry={"max_retries": 0}
        )
        again = runner.start_leaf("L0", creds, retry)
        assert not again.ok and again.error is not None
        assert "Getting Run details failed" in again.error
        assert "is not started" in (runner.status("L0").error or "")


def test_a_lost_runner_is_an_error_not_a_hang(env_290: PublishedEnv, tmp_path: Path) -> None:
    runner = PublishedLeafProcess(env_290, tmp_path / "runner")
    runner.start()
    try:
        assert runner.pid is not None
        os.kill(runner.pid, signal.SIGKILL)
        with pytest.raises(PublishedClientError, match="exited with code"):
            runner.wait_for(lambda e: False, timeout_s=30)
        with pytest.raises(PublishedClientError, match="exited with code -9"):
            runner.status("L0")
        assert not runner.alive
    finally:
        runner.stop()


def test_envs_are_cached_and_listed(env_290: PublishedEnv, env_301: PublishedEnv) -> None:
    again = prepare("branchkey == 2.9.0")
    assert again.path == env_290.path and again.created_at == env_290.created_at
    listed = {e.requirement: e for e in list_envs(env_290.path.parent)}
    assert listed["branchkey==2.9.0"].numpy_version == "1.26.4"
    assert listed["branchkey==3.0.1"].branchkey_version == "3.0.1"
    assert listed["branchkey==3.0.1"].size_bytes() > 1_000_000


def test_an_unknown_release_is_a_one_line_error_and_leaves_nothing(
    env_290: PublishedEnv, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(PublishedClientError) as info:
        prepare("branchkey==9.9.9", cache_dir=cache)
    message = str(info.value)
    assert info.value.exit_code == 2 and "\n" not in message
    if "could not be reached" in message:
        pytest.skip(f"package registry unreachable: {message}")
    assert message.startswith("branchkey==9.9.9: no release of branchkey matches")
    assert "2.9.0" in message  # the releases pip saw are named
    assert list_envs(cache) == []
    assert not (cache / "branchkey_eq9.9.9").exists()


def _two_rounds_unread(
    runner: PublishedLeafProcess, branch: _Branch, settings: LeafSettings, tmp_path: Path
) -> None:
    """Round 1's notification stays unread in the one-slot queue while round 2 closes."""
    assert runner.start_leaf("L0", branch.leaves[0], settings).ok
    for number in (1, 2):
        path = save_weights(tmp_path / f"r{number}.npz", 1.0, _models(number, 1)[0])
        assert runner.upload("L0", path).ok
        runner.wait_for(lambda _e, n=number: len(runner.events(Notification)) >= n, timeout_s=30)


def test_2_9_0_amqp_replaces_an_unread_notification(
    env_290: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    settings = LeafSettings.for_broker(published_platform.url, AMQP_URL, transport="amqp")
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(env_290, tmp_path / "runner") as runner,
    ):
        _two_rounds_unread(runner, branch, settings, tmp_path)
        notes = [e for e in runner.events(Notification) if isinstance(e, Notification)]
        first, second = notes[0].aggregation_id, notes[1].aggregation_id
        dropped = runner.wait_for(lambda e: isinstance(e, NotificationDropped), timeout_s=10)
        assert isinstance(dropped, NotificationDropped)
        assert (dropped.aggregation_id, dropped.by) == (first, "client")
        reply = runner.wait_notification("L0", timeout_s=5)
        assert reply.ok and reply.result is not None
        assert reply.result["aggregation_id"] == second  # the newest; round 1's is gone


def test_websocket_consumer_blocks_on_an_unread_notification(
    any_env: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    settings = LeafSettings(host=published_platform.url, transport="websocket")
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(any_env, tmp_path / "runner") as runner,
    ):
        _two_rounds_unread(runner, branch, settings, tmp_path)
        notes = [e for e in runner.events(Notification) if isinstance(e, Notification)]
        first, second = notes[0].aggregation_id, notes[1].aggregation_id
        # The consumer's put waits while the slot is taken: the leaf reads round 1 first.
        taken = runner.wait_notification("L0", timeout_s=5)
        assert taken.ok and taken.result is not None and taken.result["aggregation_id"] == first
        blocked = runner.wait_for(lambda e: isinstance(e, NotificationBlocked), timeout_s=10)
        assert isinstance(blocked, NotificationBlocked) and blocked.aggregation_id == second
        assert blocked.blocked_s > 0
        taken = runner.wait_notification("L0", timeout_s=5)
        assert taken.ok and taken.result is not None and taken.result["aggregation_id"] == second
        assert not runner.events(NotificationDropped)


def test_2_9_0_without_a_broker_builds_a_client_that_never_consumes(
    env_290: PublishedEnv, published_platform: PlatformHandle, tmp_path: Path
) -> None:
    """The constructor blocks on the broker (pika: 3 connection attempts 3 s apart), and
    when the package gives up it still returns a client, with no consumer at all."""
    settings = LeafSettings(
        host=published_platform.url,
        transport="amqp",
        rabbitmq_host="127.0.0.1",
        rabbitmq_port=1,  # nothing listens there
        rabbitmq_ssl=False,
        reconnect_max_attempts=1,
    )
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(env_290, tmp_path / "runner") as runner,
    ):
        reply = runner.start_leaf("L0", branch.leaves[0], settings, timeout_s=60)
        assert reply.ok, reply.error
        assert reply.result is not None and reply.result["construct_s"] >= 5.0
        print(f"\n2.9.0 constructor without a broker: {reply.result['construct_s']:.1f} s")
        stopped = runner.wait_for(lambda e: isinstance(e, ConsumerStopped), timeout_s=10)
        assert isinstance(stopped, ConsumerStopped) and stopped.leaf == "L0"
        printed = [e.text for e in runner.events(Printed) if isinstance(e, Printed)]
        assert any("Failed to start RabbitMQ consumer" in text for text in printed), printed
        status = runner.status("L0")
        assert status.ok and status.result is not None
        assert status.result["consumer_alive"] is False


def test_2_9_0_amqp_reconnects_after_a_forced_close_and_is_observed(
    env_290: PublishedEnv,
    published_platform: PlatformHandle,
    management: ManagementAPI,
    tmp_path: Path,
) -> None:
    settings = LeafSettings.for_broker(published_platform.url, AMQP_URL, transport="amqp")
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(env_290, tmp_path / "runner") as runner,
    ):
        leaf_id = branch.leaves[0]["id"]
        assert runner.start_leaf("L0", branch.leaves[0], settings).ok

        def phase(name: str, nth: int = 1) -> ConsumerPhase:
            def seen(_e: object) -> bool:
                found = [
                    e
                    for e in runner.events(ConsumerPhase)
                    if isinstance(e, ConsumerPhase) and e.phase == name
                ]
                return len(found) >= nth

            runner.wait_for(seen, timeout_s=30)
            return [
                e
                for e in runner.events(ConsumerPhase)
                if isinstance(e, ConsumerPhase) and e.phase == name
            ][nth - 1]

        phase("consuming")
        management.close_user_connections(leaf_id)
        lost = phase("connection_lost")
        back = phase("reconnected")
        again = phase("consuming", 2)
        assert lost.t <= back.t <= again.t
        print(f"\n2.9.0 AMQP forced close: consuming again after {again.t - lost.t:.3f} s")
        assert runner.status("L0").result == {
            "run_status": "start",
            "run_number": 1,
            "consumer_alive": True,
            "queue_size": 0,
        }
        path = save_weights(tmp_path / "w.npz", 2.0, _models(3, 1)[0])
        reply = runner.play_round("L0", path, notification_timeout_s=30)
        assert reply.ok, f"{reply.stage}: {reply.error}"


def test_2_9_0_amqp_consumer_stops_for_good_on_a_channel_error(
    env_290: PublishedEnv,
    published_platform: PlatformHandle,
    management: ManagementAPI,
    tmp_path: Path,
) -> None:
    """Its consumer reconnects on connection errors only: a channel error (here its queue
    is deleted, and consuming again is answered 404) ends the consumer for good, and the
    client lives on without one."""
    settings = LeafSettings.for_broker(published_platform.url, AMQP_URL, transport="amqp")
    with (
        _branch(published_platform, 1) as branch,
        PublishedLeafProcess(env_290, tmp_path / "runner") as runner,
    ):
        leaf = branch.leaves[0]
        assert runner.start_leaf("L0", leaf, settings).ok
        runner.wait_for(
            lambda e: isinstance(e, ConsumerPhase) and e.phase == "consuming", timeout_s=30
        )
        management.delete_queue(leaf["tree_id"], leaf["id"])
        stopped = runner.wait_for(lambda e: isinstance(e, ConsumerStopped), timeout_s=30)
        assert isinstance(stopped, ConsumerStopped) and stopped.leaf == "L0"
        phases = [e.phase for e in runner.events(ConsumerPhase) if isinstance(e, ConsumerPhase)]
        assert "error" in phases and "reconnecting" not in phases, phases
        status = runner.status("L0")
        assert status.ok and status.result is not None
        assert status.result["consumer_alive"] is False


def test_a_hung_pip_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(PublishedClientError, match=r"did not finish within 0 s") as info:
        prepare("branchkey==2.9.0", cache_dir=cache, timeout_s=0.01)
    assert info.value.exit_code == 2
    assert list_envs(cache) == []
    assert not (cache / "branchkey_eq2.9.0").exists()


@pytest.mark.parametrize("kill", [False, True], ids=["clean-close", "killed"])
def test_websocket_reconnects_after_a_platform_restart_and_is_observed(
    env_301: PublishedEnv, tmp_path: Path, kill: bool
) -> None:
    handle = start_platform(tmp_path / "platform", no_amqp=True)
    try:
        settings = LeafSettings(
            host=handle.url, transport="websocket", reconnect_backoff_factor=1.0
        )
        with (
            _branch(handle, 1) as branch,
            PublishedLeafProcess(env_301, tmp_path / "runner") as runner,
        ):
            assert runner.start_leaf("L0", branch.leaves[0], settings).ok

            def phases() -> list[ConsumerPhase]:
                return [e for e in runner.events(ConsumerPhase) if isinstance(e, ConsumerPhase)]

            runner.wait_for(lambda _e: any(p.phase == "consuming" for p in phases()), timeout_s=30)
            handle.restart(kill=kill)
            runner.wait_for(
                lambda _e: sum(p.phase == "consuming" for p in phases()) >= 2, timeout_s=60
            )
            seen = [p.phase for p in phases()]
            lost = seen.index("connection_lost")
            assert "reconnect_wait" in seen[lost:] and "consuming" in seen[lost:], seen
            # One loss, one connection_lost. A clean close (going away) ends the package's
            # receive loop without a log line: the runner infers the loss from the next
            # ticket request. A killed platform's reset is logged (twice: one is kept).
            losses = [p.inferred for p in phases() if p.phase == "connection_lost"]
            assert losses == [not kill], [(p.phase, p.message[:80]) for p in phases()]
            waits = [p.delay_s for p in phases() if p.phase == "reconnect_wait"]
            assert waits and all(w == 1.0 for w in waits)  # backoff_factor 1.0: 1 s each
            down = next(p for p in phases() if p.phase == "connection_lost")
            up = [p for p in phases() if p.phase == "consuming"][1]
            how = "killed" if kill else "clean"
            print(
                f"\n3.0.1 WebSocket, {how} platform restart: consuming after {up.t - down.t:.2f} s"
            )
            path = save_weights(tmp_path / "w.npz", 1.0, _models(5, 1)[0])
            reply = runner.play_round("L0", path, notification_timeout_s=30)
            assert reply.ok, f"{reply.stage}: {reply.error}"
    finally:
        handle.stop()
