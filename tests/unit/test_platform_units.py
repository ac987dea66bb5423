"""Pure parts of the reference platform: URL signing, fault specs, config parsing, the
store's persistence, and the round's layout check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bk_sim.errors import BrokerError, PlatformError
from bk_sim.platform._app import _declared_size, _parse_config
from bk_sim.platform._faults import BranchFaults, FaultSpecError
from bk_sim.platform._notify import AmqpPublisher
from bk_sim.platform._rounds import RequestRejected, _check_signature, _signature
from bk_sim.platform._signing import UrlSigner, load_or_create_secret
from bk_sim.platform._store import Store, is_file_id, new_id
from bk_sim.weights import encode_weights, validate_weights

BASE = {
    "strategy": "fedavg",
    "quorum": None,
    "round_timeout_s": None,
    "trim_fraction": 0.1,
    "model_config": {},
}


def test_signed_urls_verify_expire_and_resist_forgery(tmp_path: Path) -> None:
    secret = load_or_create_secret(tmp_path / "k")
    assert load_or_create_secret(tmp_path / "k") == secret  # persisted
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    (tmp_path / "short").write_bytes(b"abc")  # too short to be a key: replaced...
    (tmp_path / "short").chmod(0o644)
    assert len(load_or_create_secret(tmp_path / "short")) == 32
    assert (tmp_path / "short").stat().st_mode & 0o777 == 0o600  # ...and no longer readable
    signer = UrlSigner(secret, ttl_s=60)
    fid = new_id()
    q = dict(p.split("=") for p in signer.query(fid, now=1000).split("&"))
    assert q["expires"] == "1060"
    assert signer.verify(fid, q["expires"], q["sig"], now=1059)
    assert not signer.verify(fid, q["expires"], q["sig"], now=1061)  # expired
    assert not signer.verify(new_id(), q["expires"], q["sig"], now=1000)  # other file
    assert not signer.verify(fid, "1061", q["sig"], now=1000)  # extended expiry
    assert not signer.verify(fid, "soon", q["sig"], now=1000)
    assert not signer.verify(fid, q["expires"], "\u00e9" + q["sig"][1:], now=1000)  # no 500
    assert not UrlSigner(b"x" * 32).verify(fid, q["expires"], q["sig"], now=1000)


def test_fault_rates_follow_the_seed_and_counts_run_out() -> None:
    spec = {
        "seed": 5,
        "http": [{"endpoint": "upload", "rate": 0.5}, {"endpoint": "*", "status": 429, "count": 2}],
    }
    a, b = BranchFaults.from_json(spec), BranchFaults.from_json(spec)
    seq_a = [a.pick_http("upload") is not None for _ in range(20)]
    assert seq_a == [b.pick_http("upload") is not None for _ in range(20)]
    assert 0 < sum(seq_a) < 20
    c = BranchFaults.from_json(spec)
    assert [r.status if (r := c.pick_http("run")) else None for _ in range(3)] == [429, 429, None]
    assert c.to_json()["http"][1]["count"] == 0
    assert BranchFaults.from_json({}).pick_http("upload") is None


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ([], "must be a JSON object"),
        ({"http": {}}, "http must be a list"),
        ({"http": [{"status": 200}]}, "HTTP error status"),
        ({"http": [{"count": -1}]}, "count must be null"),
        ({"http": [{"latency_s": "slow"}]}, "latency_s must be a finite number"),
        ({"http": [{"reset": 1}]}, "reset must be true or false"),
        ({"http": [{"bogus": 1}]}, "unknown keys bogus"),
        ({"notifications": {"drop_rate": 1.5}}, "drop_rate must be within"),
        ({"aggregation": "stale2"}, "aggregation must be null"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"notifications": {"delay_s": 10**400}}, "delay_s must be a finite number"),
    ],
)
def test_bad_fault_specs_name_the_field(spec: object, needle: str) -> None:
    with pytest.raises(FaultSpecError, match=needle):
        BranchFaults.from_json(spec)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"strategy": "max"}, "strategy must be one of"),
        ({"quorum": 0}, "quorum must be null or an integer >= 1"),
        ({"quorum": True}, "quorum must be null"),
        ({"quorum": 2**63}, "quorum must be null"),  # past SQLite INTEGER: was a 500
        ({"round_timeout_s": 10**400}, "round_timeout_s must be null"),  # was OverflowError
        ({"round_timeout_s": -1}, "round_timeout_s must be null or a number > 0"),
        ({"trim_fraction": 0.5}, r"trim_fraction must be a number in \[0, 0.5\)"),
        ({"model_config": []}, "model_config must be a JSON object"),
        ({"colour": "red"}, "unknown config keys: colour"),
    ],
)
def test_bad_branch_config_is_400_naming_the_field(body: dict[str, object], needle: str) -> None:
    with pytest.raises(RequestRejected, match=needle) as err:
        _parse_config(body, base=BASE)
    assert err.value.status == 400


def test_partial_config_keeps_the_rest() -> None:
    merged = _parse_config({"quorum": 3, "round_timeout_s": 2}, base=BASE)
    assert merged == {**BASE, "quorum": 3, "round_timeout_s": 2.0}


def test_declared_size_header() -> None:
    assert _declared_size(None, 10) is None
    assert _declared_size("10", 10) == 10
    with pytest.raises(RequestRejected) as err:
        _declared_size("11", 10)
    assert err.value.status == 413
    for bad in ("x", "-1"):
        with pytest.raises(RequestRejected) as err:
            _declared_size(bad, 10)
        assert err.value.status == 400


def test_round_layout_check_names_the_layer() -> None:
    first = validate_weights(encode_weights(1.0, [np.ones((2, 3), np.float32), np.ones(4)]))
    sig = _signature(first)
    _check_signature(sig, first)
    for layers, needle in (
        ([np.ones((3, 2), np.float32), np.ones(4)], r"layer_0 has shape \(3, 2\)"),
        ([np.ones((2, 3), np.float32), np.ones(4, np.int64)], "layer_1 has dtype"),
        ([np.ones((2, 3), np.float32)], "upload has 1 layers; this round's uploads have 2"),
    ):
        info = validate_weights(encode_weights(1.0, layers))
        with pytest.raises(RequestRejected, match=needle):
            _check_signature(sig, info)


def test_store_survives_reopen_and_refuses_unsafe_ids(tmp_path: Path) -> None:
    store = Store(tmp_path)
    tree = store.create_tree("t")
    branch = store.create_branch(tree["id"], "b", dict(BASE))
    leaf = store.add_leaf(branch, new_id(), "leaf-0", "secret-token")
    rnd = store.open_round(
        store.update_branch(branch["id"], run_status="start", run_number=1), [[[2]], ["<f4"]]
    )
    fid = new_id()
    store.add_upload(
        file_id=fid,
        branch_id=branch["id"],
        number=rnd["round"],
        leaf_id=leaf.id,
        digest="sha256=x",
        weighting=2.0,
        size=10,
        replace=True,
    )
    store.close()
    again = Store(tmp_path)
    [loaded] = again.leaves(branch["id"])
    assert loaded.token_matches("secret-token") and not loaded.token_matches("other")
    assert "secret-token" not in (tmp_path / "platform.sqlite3").read_bytes().decode("latin-1")
    record = again.round_record(branch["id"], 1)
    assert record is not None and record["status"] == "open"
    assert [(u["file_id"], u["weighting"]) for u in record["uploads"]] == [(fid, 2.0)]
    assert again.rounds_to_resume()[0]["round"] == 1
    for bad in ("../x", "a/b", "", fid.upper(), fid + "\n"):
        assert not is_file_id(bad)
        with pytest.raises(PlatformError):
            again.file_path(bad)
    leaves, files = again.delete_tree(tree["id"])
    assert leaves == [leaf.id] and files == [fid]
    assert again.branch(branch["id"]) is None
    again.close()


def test_retry_window_covers_open_and_recently_closed_rounds() -> None:
    from datetime import datetime, timedelta, timezone

    from bk_sim.platform._rounds import RETRY_WINDOW_S, _within_retry_window

    now = datetime.now(timezone.utc)
    assert _within_retry_window({"closed_at": None})
    assert _within_retry_window({"closed_at": (now - timedelta(seconds=5)).isoformat()})
    old = now - timedelta(seconds=RETRY_WINDOW_S + 5)
    assert not _within_retry_window({"closed_at": old.isoformat()})


def test_public_surface_is_pinned() -> None:
    import bk_sim.platform

    assert bk_sim.platform.__all__ == [
        "AGGREGATION_STRATEGIES",
        "DEFAULT_AMQP_URL",
        "DEFAULT_MAX_DECOMPRESSED_BYTES",
        "DEFAULT_MAX_UPLOAD_BYTES",
        "READ_THREADS",
        "Upload",
        "aggregate",
        "streaming_average",
        "AdminClient",
        "Limits",
        "PlatformConfig",
        "PlatformHandle",
        "build_app",
        "limit_options",
        "parse_field_ops",
        "serve",
        "start_platform",
        "validate_stored",
    ]


def test_publisher_resolves_every_future_even_when_a_publish_raises_unexpectedly() -> None:
    """A non-AMQP error (here the URL's bad port, raised before any socket) used to kill
    the publisher thread, leaving this and every later publish awaited forever."""
    publisher = AmqpPublisher("amqp://guest:guest@127.0.0.1:notaport/")
    publisher.start()
    try:
        for _ in range(2):
            fut = publisher.publish("vhost", "exchange", "", b"{}")
            with pytest.raises(BrokerError, match="publish to vhost vhost failed"):
                fut.result(timeout=10)
    finally:
        publisher.stop()
    with pytest.raises(PlatformError, match="stopped"):
        publisher.publish("vhost", "exchange", "", b"{}").result(timeout=1)


def test_an_unexpected_aggregation_error_fails_the_round_instead_of_leaving_it_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from bk_sim.platform import _rounds
    from bk_sim.platform._notify import Notifier, WsHub

    def boom(*_args: object) -> int:
        raise RuntimeError("numpy said no")

    monkeypatch.setattr(_rounds, "_aggregate_to_file", boom)
    store = Store(tmp_path)
    branch = store.create_branch(store.create_tree("t")["id"], "b", dict(BASE))
    branch = store.update_branch(branch["id"], run_status="start", run_number=1)
    leaf = store.add_leaf(branch, new_id(), "leaf-0", "token")
    info = validate_weights(encode_weights(1.0, [np.ones(2)]))

    async def run() -> None:
        with ThreadPoolExecutor(1) as pool:
            rounds = _rounds.RoundManager(
                store, Notifier(None, WsHub()), lambda _b: None, pool, max_decompressed_bytes=None
            )
            await rounds.submit(leaf, file_id=new_id(), digest="sha256=x", size=1, info=info)
            await rounds.shutdown()  # waits for the aggregation task

    asyncio.run(run())
    record = store.round_record(branch["id"], 1)
    assert record is not None and record["close_reason"] == "all_uploaded"
    assert record["status"] == "failed" and "numpy said no" in record["error"]
    assert store.rounds_to_resume() == []
    assert "aggregation failed" in caplog.text
    store.close()


def test_websocket_backlog_survives_a_leaf_that_drops_while_it_is_sent() -> None:
    """A send failing mid-backlog used to lose the rest (popped, never re-queued) and let
    the error escape the WebSocket handler before it could detach the connection."""
    import asyncio

    from bk_sim.platform._notify import WsHub

    class _Flaky:
        closed = False

        def __init__(self, fail_after: int) -> None:
            self.got: list[str] = []
            self._left = fail_after

        async def send_str(self, text: str) -> None:
            if self._left == 0:
                raise ConnectionResetError("Cannot write to closing transport")
            self._left -= 1
            self.got.append(text)

    async def run() -> tuple[list[str], list[str]]:
        hub = WsHub()
        first = _Flaky(fail_after=1)
        await hub.attach("leaf", first)  # type: ignore[arg-type]
        hub.detach("leaf", first)  # type: ignore[arg-type]
        for n in range(3):
            await hub.send("leaf", f"m{n}")
        dropping = _Flaky(fail_after=1)
        await hub.attach("leaf", dropping)  # type: ignore[arg-type]
        hub.detach("leaf", dropping)  # type: ignore[arg-type]
        again = _Flaky(fail_after=10)
        await hub.attach("leaf", again)  # type: ignore[arg-type]
        return dropping.got, again.got

    dropped_got, again_got = asyncio.run(run())
    assert dropped_got == ["m0"]
    assert again_got == ["m1", "m2"]  # the rest, in order, on the next connection


def test_a_notification_sent_between_ticket_and_connect_waits_for_the_leaf() -> None:
    import asyncio

    from bk_sim.platform._notify import WsHub

    class _Ws:
        closed = False

        def __init__(self) -> None:
            self.got: list[str] = []

        async def send_str(self, text: str) -> None:
            self.got.append(text)

    async def run() -> tuple[list[str], list[str]]:
        hub = WsHub()
        await hub.send("never-asked", "dropped")  # a leaf that never used WebSocket
        hub.issue_ticket("leaf", "t", "r")
        await hub.send("leaf", "m1")  # the round closed before the leaf connected
        ws, other = _Ws(), _Ws()
        await hub.attach("leaf", ws)  # type: ignore[arg-type]
        await hub.attach("never-asked", other)  # type: ignore[arg-type]
        return ws.got, other.got

    assert asyncio.run(run()) == (["m1"], [])
