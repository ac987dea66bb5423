"""Chaos logic without services: schedule validation, targets, phases, judgement, injectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bk_sim.broker import BrokerEndpoints
from bk_sim.chaos import (
    BrokerInjector,
    HttpInjector,
    PhaseTracker,
    _injectors,
    fault_targets,
    judge_chaos,
)
from bk_sim.engine import Judgement, LeafPlan, RoundRecord, RoundVerdict
from bk_sim.errors import BrokerError, ScenarioError
from bk_sim.scenario import load_scenario, scenario_from_dict
from bk_sim.scenario._spec import ChaosFaultSpec

ROOT = Path(__file__).resolve().parents[2]


def _scenario(faults: list[dict[str, Any]], **chaos: Any) -> Any:
    data: dict[str, Any] = {
        "name": "c",
        "leaves": {"count": 4},
        "model": {"preset": "tiny"},
        "rounds": 3,
        "platform": {"quorum": 2, "round_timeout_s": 5},
        "client": {"reconnect": {"backoff_factor": 1.5, "max_delay": 4, "heartbeat": 2}},
        "chaos": {"faults": faults, **chaos},
    }
    return scenario_from_dict(data)


# ------------------------------------------------------------------ schedule validation


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"kind": "kill_connections"}, "give exactly one of at_s (seconds) or round"),
        ({"kind": "kill_connections", "at_s": 1, "round": 1}, "give exactly one of at_s"),
        ({"kind": "blackhole", "at_s": 1}, "chaos.faults[0].duration_s: is required for kind"),
        (
            {"kind": "kill_connections", "at_s": 1, "duration_s": 3},
            "does not apply to kind 'kill_connections' (it is instantaneous)",
        ),
        ({"kind": "http", "at_s": 1, "duration_s": 2}, "is required for kind 'http' and only"),
        ({"kind": "latency", "at_s": 1, "duration_s": 2}, "expected latency_s or jitter_s > 0"),
        ({"kind": "bandwidth", "at_s": 1, "duration_s": 2}, "bandwidth_kbps: is required"),
        ({"kind": "kill_connections", "round": 4}, "round: expected at most rounds (3); found 4"),
        ({"kind": "close_channel", "at_s": 0, "restart": True}, "applies only to kind 'kill_leaf'"),
        ({"kind": "kill_connections", "at_s": 0, "leaves": 0}, "leaves: expected a number in (0"),
        ({"kind": "blackhole", "round": 1, "when": "round_star", "duration_s": 1}, "did you mean"),
    ],
)
def test_bad_fault_schedules_are_refused_with_the_key_path(
    fault: dict[str, Any], message: str
) -> None:
    with pytest.raises(ScenarioError) as err:
        _scenario([fault])
    assert "chaos.faults[0]" in str(err.value)
    assert message in str(err.value)


def test_broker_restart_is_refused_unless_the_broker_is_the_runs_own() -> None:
    with pytest.raises(ScenarioError, match="set chaos.broker_restartable: true only for a broker"):
        _scenario([{"kind": "restart_broker", "round": 2}])
    ok = _scenario([{"kind": "restart_broker", "round": 2}], broker_restartable=True)
    assert ok.chaos.broker_restartable is True


def test_kill_leaf_needs_a_round_timeout() -> None:
    data = {
        "name": "c",
        "leaves": {"count": 2},
        "model": {"preset": "tiny"},
        "chaos": {"faults": [{"kind": "kill_leaf", "round": 1}]},
    }
    with pytest.raises(ScenarioError, match="kill_leaf leaves a round short of uploads"):
        scenario_from_dict(data)


@pytest.mark.parametrize("name", ["reconnect_chaos", "broker_restart", "retry_storm"])
def test_shipped_chaos_scenarios_load(name: str) -> None:
    sc = load_scenario(ROOT / "scenarios" / f"{name}.yaml")
    assert sc.chaos.faults
    kinds = {f.kind for f in sc.chaos.faults}
    assert sc.chaos.broker_restartable == ("restart_broker" in kinds)


def test_reconnect_chaos_ships_the_faults_the_issue_asks_for() -> None:
    sc = load_scenario(ROOT / "scenarios" / "reconnect_chaos.yaml")
    assert sc.leaves.count == 20 and sc.rounds == 5
    kinds = [f.kind for f in sc.chaos.faults]
    assert {"kill_connections", "blackhole", "http"} <= set(kinds)
    stall = next(f for f in sc.chaos.faults if f.kind == "blackhole")
    hb = sc.client.reconnect.heartbeat
    # pika notices a stalled peer within two checks of (heartbeat + 5) s: the stall must
    # outlast that, or the leaves would learn of it from the TCP close at its end.
    assert stall.duration_s is not None and stall.duration_s > 2 * (hb + 5)


# ------------------------------------------------------------------ targets


def test_fault_targets_are_a_seeded_fraction_of_the_leaves() -> None:
    f = ChaosFaultSpec(kind="kill_connections", round=1, leaves=0.25)
    a = fault_targets(7, 0, f, 20)
    assert len(a) == 5 and a == sorted(a) and len(set(a)) == 5
    assert a == fault_targets(7, 0, f, 20)
    assert a != fault_targets(7, 1, f, 20) or a != fault_targets(8, 0, f, 20)
    assert fault_targets(7, 0, ChaosFaultSpec(kind="kill_leaf", at_s=0, leaves=0.01), 20) != []
    # Network and HTTP faults act on every connection / request.
    assert fault_targets(
        7, 0, ChaosFaultSpec(kind="blackhole", at_s=0, leaves=0.1, duration_s=1), 4
    ) == [0, 1, 2, 3]


# ------------------------------------------------------------------ phases


def _plans(n: int, skip: dict[int, frozenset[int]] | None = None) -> list[LeafPlan]:
    skip = skip or {}
    return [
        LeafPlan(
            index=i,
            credentials={"id": f"L{i}"},
            weighting=1.0,
            skip_rounds=skip.get(i, frozenset()),
        )
        for i in range(n)
    ]


def test_phases_follow_the_uploads_and_notifications() -> None:
    tr = PhaseTracker(_plans(4, {3: frozenset({1})}), rounds=2)
    tr.start(t=100.0)
    assert tr.reached(1, "round_start") == 100.0
    assert tr.expected_uploads(1) == 3  # leaf 3 skips round 1
    tr.on_event({"kind": "upload", "round": 1, "leaf": 0, "file_id": "f0", "t": 101.0})
    assert tr.reached(1, "first_upload") == 101.0
    assert tr.reached(1, "uploads_half_done") is None
    tr.on_event({"kind": "upload", "round": 1, "leaf": 1, "file_id": "f1", "t": 102.0})
    assert tr.reached(1, "uploads_half_done") == 102.0
    assert tr.reached(1, "awaiting_aggregate") is None
    tr.on_event({"kind": "upload", "round": 1, "leaf": 2, "file_id": "f2", "t": 103.0})
    assert tr.reached(1, "awaiting_aggregate") == 103.0
    assert tr.reached(2, "round_start") == 103.0
    tr.on_event({"kind": "aggregate_notified", "round": 1, "leaf": 0, "t": 104.0})
    assert tr.reached(1, "round_closed") == 104.0
    # A killed leaf no longer counts towards a round's expected uploads.
    for i in (0, 1):
        tr.on_event({"kind": "upload", "round": 2, "leaf": i, "file_id": f"g{i}", "t": 105.0})
    assert tr.reached(2, "awaiting_aggregate") is None
    tr.set_down([2, 3], True)
    assert tr.expected_uploads(2) == 2
    assert tr.reached(2, "awaiting_aggregate") is not None


# ------------------------------------------------------------------ judgement


def _ev(kind: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "t": t, **fields}


def _Judgement(rounds: list[dict[str, Any]]) -> Judgement:  # noqa: N802
    return Judgement(
        rounds=[
            RoundVerdict(r["round"], None, "fedavg", None, 0, passed=r["passed"]) for r in rounds
        ]
    )


_ROUND_1_PASSED = _Judgement([{"round": 1, "passed": True}])


def _records(records: list[dict[str, Any]] | None) -> list[RoundRecord] | None:
    return None if records is None else [RoundRecord.from_dict(r) for r in records]


def _judge_fixture() -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]]]:
    sc = _scenario([{"kind": "kill_connections", "round": 1}])
    a, b = "leaf-a", "leaf-b"
    events = [
        _ev("leaf_started", 90.0, leaf=0, leaf_id=a),
        _ev("leaf_started", 90.0, leaf=1, leaf_id=b),
        _ev("upload", 95.0, leaf=0, leaf_id=a, round=1, file_id="f1"),
        _ev("upload", 95.0, leaf=1, leaf_id=b, round=1, file_id="f3"),
        _ev(
            "fault_start",
            100.0,
            fault="kill",
            fault_kind="kill_connections",
            leaves=[0, 1],
            target="all leaves",
            round=1,
        ),
        _ev("fault_end", 100.05, fault="kill", fault_kind="kill_connections"),
        _ev("disconnect", 100.01, leaf=0, leaf_id=a, error="320 CONNECTION_FORCED"),
        _ev("reconnect_wait", 100.01, leaf=0, leaf_id=a, attempt=1, delay_s=1.5),
        _ev("connect_failed", 101.6, leaf=0, leaf_id=a, attempt=1),
        _ev("reconnect_wait", 101.6, leaf=0, leaf_id=a, attempt=2, delay_s=2.25),
        _ev("connect", 104.0, leaf=0, leaf_id=a, attempt=2),
        _ev("disconnect", 100.5, leaf=1, leaf_id=b, error="320 CONNECTION_FORCED"),
        _ev("reconnect_wait", 100.5, leaf=1, leaf_id=b, attempt=1, delay_s=3.0),  # wrong
        _ev("connect", 103.6, leaf=1, leaf_id=b, attempt=1),
        _ev(
            "notification",
            105.0,
            leaf=0,
            leaf_id=a,
            message_type="aggregation_status",
            value="agg1",
        ),
        _ev(
            "notification",
            105.1,
            leaf=0,
            leaf_id=a,
            message_type="aggregation_status",
            value="agg1",
        ),
    ]
    records = [
        {
            "round": 1,
            "status": "aggregated",
            "aggregation_id": "agg1",
            "closed_at": 102.0,
            "uploads": [
                {"leaf_id": a, "file_id": "f1"},
                {"leaf_id": b, "file_id": "f2"},
                {"leaf_id": b, "file_id": "f3"},
            ],
        },
    ]
    return sc, events, records


def test_judge_measures_detection_reconnect_and_backoff_per_leaf() -> None:
    sc, events, records = _judge_fixture()
    checks, section = judge_chaos(sc, events, _records(records), _ROUND_1_PASSED)
    (fault,) = section["faults"]
    rows = {r["leaf"]: r for r in fault["per_leaf"]}
    assert rows[0]["detect_s"] == pytest.approx(0.01)
    assert rows[0]["reconnect_s"] == pytest.approx(3.99)
    assert rows[0]["attempts"] == 2 and rows[0]["failed_attempts"] == 1
    assert [w["delay_s"] for w in rows[0]["waits"]] == [1.5, 2.25]
    assert rows[0]["backoff_ok"] is True
    assert rows[1]["backoff_ok"] is False  # 1.5 ** 1 is 1.5 s, not 3 s
    assert section["backoff_violations"] == [
        {"fault": "kill", "leaf": 1, "attempt": 1, "delay_s": 3.0, "expected_s": 1.5}
    ]
    assert fault["disconnected"] == 2 and fault["reconnected"] == 2
    by_name = {c.name: c for c in checks}
    assert not by_name["chaos: reconnect waits follow min(factor^n, max_delay)"].passed
    assert by_name["chaos: every disconnected leaf reconnected within 30 s"].passed


def test_judge_counts_lost_and_duplicated_notifications_and_names_double_counts() -> None:
    sc, events, records = _judge_fixture()
    checks, section = judge_chaos(sc, events, _records(records), _ROUND_1_PASSED)
    n = section["notifications"]
    assert (n["expected"], n["received"], n["lost"], n["duplicates"]) == (2, 1, 1, 1)
    assert n["lost_examples"] == [{"leaf_id": "leaf-b", "aggregation_id": "agg1"}]
    assert section["uploads"]["double_counted"] == [
        {"round": 1, "leaf": 1, "leaf_id": "leaf-b", "count": 2}
    ]
    per_fault = section["faults"][0]["notifications"]
    assert (per_fault["expected"], per_fault["lost"], per_fault["duplicated"]) == (2, 1, 1)
    assert per_fault["max_delivery_s"] == pytest.approx(3.0)  # closed 102, delivered 105
    by_name = {c.name: c for c in checks}
    assert not by_name["chaos: at most 0 notifications lost"].passed
    assert not by_name["chaos: at most 0 notifications handled twice"].passed
    dup = by_name["chaos: at most 0 uploads counted twice"]
    assert not dup.passed and "leaf 1 (leaf-b) counted 2 times" in dup.message


def test_without_round_records_uploads_counted_twice_cannot_pass() -> None:
    """A remote platform without its admin API: the check is not made, so it fails, and
    notifications are owed for the aggregates the leaves heard of."""
    sc, events, _ = _judge_fixture()
    events = [{**e, "weighting": 1.0} if e["kind"] == "upload" else e for e in events]
    events.append(
        _ev("aggregate_notified", 105.0, leaf=0, leaf_id="leaf-a", round=1, aggregation_id="agg1")
    )
    checks, section = judge_chaos(sc, events, _records(None), _ROUND_1_PASSED)
    by_name = {c.name: c for c in checks}
    dup = by_name["chaos: at most 0 uploads counted twice"]
    assert not dup.passed and dup.message.startswith("cannot be judged: no round records")
    n = section["notifications"]
    assert (n["expected"], n["lost"], n["duplicates"]) == (2, 1, 1)
    assert not by_name["chaos: at most 0 notifications lost"].passed


def test_a_leaf_that_never_reconnects_fails_the_reconnect_check() -> None:
    sc, events, records = _judge_fixture()
    events = [e for e in events if not (e["kind"] == "connect" and e.get("leaf") == 1)]
    checks, _ = judge_chaos(sc, events, _records(records), _ROUND_1_PASSED)
    check = next(c for c in checks if c.name.startswith("chaos: every disconnected leaf"))
    assert not check.passed and "never reconnected: leaf 1 (leaf-b)" in check.message


def test_a_killed_and_restarted_leaf_is_owed_only_what_closed_while_it_lived() -> None:
    sc = _scenario([{"kind": "kill_leaf", "round": 1, "restart": True}])
    events = [
        _ev("leaf_started", 10.0, leaf=0, leaf_id="a"),
        _ev("leaf_died", 20.0, leaf=0, leaf_id="a", round=1, reason="chaos: process 1 killed"),
        _ev("leaf_started", 40.0, leaf=0, leaf_id="a"),
        _ev(
            "notification", 41.0, leaf=0, leaf_id="a", message_type="aggregation_status", value="r2"
        ),  # closed while dead: delivered from its queue, not owed
        _ev(
            "notification", 51.0, leaf=0, leaf_id="a", message_type="aggregation_status", value="r3"
        ),
    ]
    records = [
        {"round": 1, "status": "aggregated", "aggregation_id": "r1", "closed_at": 15.0},
        {"round": 2, "status": "aggregated", "aggregation_id": "r2", "closed_at": 30.0},
        {"round": 3, "status": "aggregated", "aggregation_id": "r3", "closed_at": 50.0},
    ]
    _, section = judge_chaos(sc, events, _records(records), _Judgement([]))
    n = section["notifications"]
    assert (n["expected"], n["lost"]) == (2, 1)  # r1 (alive, never delivered) and r3
    assert n["lost_examples"] == [{"leaf_id": "a", "aggregation_id": "r1"}]
    assert section["killed"][0]["leaf"] == 0


def test_a_fault_never_injected_fails_the_run() -> None:
    sc = _scenario(
        [{"kind": "kill_connections", "round": 1}, {"kind": "close_channel", "round": 2}]
    )
    events = [
        _ev("fault_start", 1.0, fault="k", fault_kind="kill_connections", leaves=[]),
        _ev("fault_end", 1.1, fault="k", fault_kind="kill_connections"),
        _ev(
            "fault_skipped",
            2.0,
            fault="c",
            fault_kind="close_channel",
            reason="the run ended before its trigger",
        ),
    ]
    checks, _ = judge_chaos(sc, events, _records([]), _ROUND_1_PASSED)
    c = next(c for c in checks if c.name == "chaos: every scheduled fault was injected")
    assert not c.passed and "c: the run ended before its trigger" in c.message


# ------------------------------------------------------------------ injectors


def _endpoints(provider: str) -> BrokerEndpoints:
    return BrokerEndpoints(
        provider=provider,
        amqp_url="amqp://guest:guest@127.0.0.1:5672/",
        management_url="http://guest:guest@127.0.0.1:15672/",
        reason="test",
    )


def test_broker_restart_runs_stop_app_then_start_app_with_the_configured_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, ...]] = []
    ready: list[bool] = []
    monkeypatch.setattr(BrokerInjector, "_wait_ready", lambda self: ready.append(True))
    inj = BrokerInjector(
        _endpoints("local"),
        tree_id="t",
        branch_id="b",
        restartable=True,
        restart_command=("sudo", "rabbitmqctl"),
        runner=lambda argv: calls.append(tuple(argv)) or 0,
    )
    inj.restart()
    assert calls == [("sudo", "rabbitmqctl", "stop_app"), ("sudo", "rabbitmqctl", "start_app")]
    assert ready == [True]


def test_broker_restart_refuses_a_shared_or_foreign_broker() -> None:
    calls: list[Any] = []
    shared = BrokerInjector(
        _endpoints("local"),
        tree_id="t",
        branch_id="b",
        restartable=False,
        runner=lambda argv: calls.append(argv) or 0,
    )
    with pytest.raises(ScenarioError, match="broker_restartable: true"):
        shared.restart()
    external = BrokerInjector(
        _endpoints("external"),
        tree_id="t",
        branch_id="b",
        restartable=True,
        runner=lambda argv: calls.append(argv) or 0,
    )
    with pytest.raises(ScenarioError, match="cannot restart a 'external' broker"):
        external.restart()
    assert calls == []  # nothing was run


def test_an_external_broker_restarts_only_through_a_command_that_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[Any] = []
    named = BrokerInjector(
        _endpoints("external"),
        tree_id="t",
        branch_id="b",
        restartable=True,
        restart_command=("rabbitmqctl", "-n", "bk2@localhost"),
        runner=lambda argv: calls.append(argv) or 0,
    )
    monkeypatch.setattr(named, "_wait_ready", lambda: None)
    named.restart()
    assert calls == [
        ("rabbitmqctl", "-n", "bk2@localhost", "stop_app"),
        ("rabbitmqctl", "-n", "bk2@localhost", "start_app"),
    ]


def test_a_connection_fault_that_disconnected_nobody_fails_its_check() -> None:
    sc, events, records = _judge_fixture()
    hit = "chaos: every connection fault disconnected at least one leaf"
    checks, _ = judge_chaos(sc, events, _records(records), _ROUND_1_PASSED)
    assert next(c for c in checks if c.name == hit).passed
    quiet = [e for e in events if e["kind"] not in ("disconnect", "reconnect_wait")]
    checks, _ = judge_chaos(sc, quiet, _records(records), _ROUND_1_PASSED)
    check = next(c for c in checks if c.name == hit)
    assert not check.passed and "kill" in check.message


def test_a_failing_stop_app_is_an_error_and_start_app_is_not_run() -> None:
    calls: list[Any] = []
    inj = BrokerInjector(
        _endpoints("local"),
        tree_id="t",
        branch_id="b",
        restartable=True,
        runner=lambda argv: calls.append(argv) or 69,
    )
    with pytest.raises(BrokerError, match="rabbitmqctl stop_app exited 69"):
        inj.restart()
    assert len(calls) == 1


def test_testcontainers_restart_goes_through_restart_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[BrokerEndpoints] = []
    monkeypatch.setattr(_injectors, "restart_broker", lambda ep: seen.append(ep) or ep)
    inj = BrokerInjector(
        _endpoints("testcontainers"),
        tree_id="t",
        branch_id="b",
        restartable=True,
        runner=lambda argv: pytest.fail("no rabbitmqctl"),
    )
    inj.restart()
    assert len(seen) == 1


class _FakeAdmin:
    """Keeps faults as the platform does: a rule's count goes down as it fires."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"http": []}
        self.sets = 0

    def set_faults(self, branch: str, payload: dict[str, Any]) -> None:
        self.state = {**payload, "http": [dict(r) for r in payload.get("http", [])]}
        self.sets += 1

    def faults(self, branch: str) -> dict[str, Any]:
        return self.state


def test_http_faults_keep_their_remaining_count_when_another_is_added_or_removed() -> None:
    admin = _FakeAdmin()
    base = {"dedupe": True, "http": [{"endpoint": "run", "status": 500, "count": 3}]}
    inj = HttpInjector(admin, "b", base)
    inj.add("a", {"endpoint": "upload", "status": 429, "count": 10})
    admin.state["http"][1]["count"] = 4  # six hits so far
    inj.add("b", {"endpoint": "upload", "drop_response": True, "status": None, "count": 6})
    assert [r["count"] for r in admin.state["http"]] == [3, 4, 6]
    admin.state["http"][2]["count"] = 5
    inj.remove("a")
    assert admin.state["http"] == [
        {"endpoint": "run", "status": 500, "count": 3},
        {"endpoint": "upload", "drop_response": True, "status": None, "count": 5},
    ]
    assert admin.state["dedupe"] is True
    inj.remove("b")
    assert admin.state["http"] == base["http"]


def test_a_retried_upload_kept_in_the_next_round_is_a_double_count() -> None:
    sc = _scenario(
        [
            {
                "kind": "http",
                "round": 1,
                "duration_s": 1,
                "http": {"endpoint": "upload", "drop_response": True},
            }
        ]
    )
    events = [
        _ev("leaf_started", 1.0, leaf=0, leaf_id="a"),
        _ev("leaf_started", 1.0, leaf=1, leaf_id="b"),
        _ev("upload", 2.0, leaf=0, leaf_id="a", round=1, file_id="fa"),
        _ev(
            "fault_start",
            1.5,
            fault="drop",
            fault_kind="http",
            leaves=[0, 1],
            http={"endpoint": "upload", "drop_response": True, "status": None},
        ),
        _ev("fault_end", 3.0, fault="drop", fault_kind="http"),
        _ev(
            "retry_wait",
            1.9,
            leaf=1,
            leaf_id="b",
            transport="http",
            endpoint="upload",
            attempt=1,
            delay_s=0.1,
            error="connection aborted",
        ),
        _ev("upload", 2.0, leaf=1, leaf_id="b", round=1, file_id="fb2"),  # the retry's id
    ]
    records = [
        {
            "round": 1,
            "uploads": [{"leaf_id": "a", "file_id": "fa"}, {"leaf_id": "b", "file_id": "fb1"}],
        },  # answer was dropped
        {"round": 2, "uploads": [{"leaf_id": "b", "file_id": "fb2"}]},
        {"round": 3, "uploads": [{"leaf_id": "stranger", "file_id": "zz"}]},
    ]
    _, section = judge_chaos(sc, events, _records(records), _Judgement([]))
    (d,) = section["uploads"]["double_counted"]
    assert (d["round"], d["leaf"], d["unconfirmed_file_id"], d["uploads_recorded"]) == (
        1,
        1,
        "fb1",
        2,
    )
    (fault,) = section["faults"]
    assert fault["http_retries"] == {"upload no answer": 1}
    assert fault["retried_uploads"] == [{"leaf": 1, "round": 1, "file_id": "fb2", "counted": 2}]


class _Ctx:
    def __init__(self, plans: list[LeafPlan], records: list[dict[str, Any]]) -> None:
        self.plans = plans
        self.branch_id = "b"
        self._records = records
        self.admin = self
        self.platform = None  # no local platform process (kill_platform)

    def rounds(self, branch: str) -> list[dict[str, Any]]:
        return self._records


def test_an_upload_a_killed_leaf_never_saw_answered_is_attributed_to_it() -> None:
    from bk_sim.chaos import ChaosRun

    sc = _scenario([{"kind": "kill_leaf", "round": 2}])
    plans = _plans(3)
    records = [
        {"round": 1, "uploads": [{"leaf_id": "L0", "file_id": "a1", "weighting": 1.0}]},
        {
            "round": 2,
            "uploads": [
                {"leaf_id": "L0", "file_id": "a2", "weighting": 2.5},  # in flight at the kill
                {"leaf_id": "L1", "file_id": "b2", "weighting": 1.0},
            ],
        },
    ]
    run = ChaosRun(sc)
    emitted: list[dict[str, Any]] = []
    run._ctx = _Ctx(plans, records)
    run._emit = emitted.append
    run.tracker = PhaseTracker(plans, 3)
    run.tracker.on_event({"kind": "upload", "round": 1, "leaf": 0, "file_id": "a1", "t": 1.0})
    run.tracker.on_event({"kind": "download", "leaf": 0, "aggregation_id": "agg1", "t": 2.0})
    run._killed = {0: (2, 0)}
    run.end()
    (e,) = emitted
    assert (e["kind"], e["leaf"], e["round"], e["file_id"], e["weighting"]) == (
        "upload",
        0,
        2,
        "a2",
        2.5,
    )
    assert e["base_aggregation_id"] == "agg1" and "killed" in e["inferred"]
    run.end()  # idempotent: nothing emitted twice
    assert len(emitted) == 1


class _Workers:
    """The slots of a run: leaf i in slot i; kill returns a pid."""

    def __init__(self, plans: list[LeafPlan]) -> None:
        self.plans = plans

    def worker_of(self, leaf_index: int) -> int:
        return leaf_index

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        return [self.plans[worker]]

    def kill(self, worker: int) -> int | None:
        return 4242


def test_an_unseen_upload_of_a_restarted_leaf_is_based_on_what_it_had_at_the_kill() -> None:
    """A leaf killed in round 2 and restarted for round 3 downloads round 3's aggregate
    before the run ends: its round-2 upload still started from round 1's."""
    from bk_sim.chaos import ChaosRun

    sc = _scenario([{"kind": "kill_leaf", "round": 2, "restart": True}])
    plans = _plans(3)
    records = [
        {"round": 2, "uploads": [{"leaf_id": "L0", "file_id": "a2", "weighting": 2.5}]},
    ]
    run = ChaosRun(sc)
    emitted: list[dict[str, Any]] = []
    ctx = _Ctx(plans, records)
    ctx.workers = _Workers(plans)
    run._ctx = ctx
    run._emit = emitted.append
    run.tracker = PhaseTracker(plans, 3)
    run.tracker.on_event({"kind": "download", "leaf": 0, "aggregation_id": "agg1", "t": 2.0})
    run._kill([0], 2)
    run.tracker.on_event({"kind": "download", "leaf": 0, "aggregation_id": "agg3", "t": 9.0})
    run.end()
    (up,) = [e for e in emitted if e["kind"] == "upload"]
    assert (up["round"], up["file_id"], up["base_aggregation_id"]) == (2, "a2", "agg1")


def _die_holding(lock: Any) -> None:
    lock.acquire()


def test_a_writer_killed_holding_the_event_queue_lock_does_not_hang_the_others() -> None:

    from bk_sim.sim import LocalProcessHost

    host = LocalProcessHost([])
    ctx = host.ctx
    events = host.events
    # A process that dies holding the queue's shared write lock, as a SIGKILLed worker
    # whose feeder thread was writing an event would.
    proc = ctx.Process(target=_die_holding, args=(events._wlock,))
    proc.start()
    proc.join(30)
    assert not events._wlock.acquire(timeout=0.2), "the lock should be left held"
    host._unstick_events()
    events.put("after the kill")
    assert events.get(timeout=5) == "after the kill"
    events.close()
    events.join_thread()
