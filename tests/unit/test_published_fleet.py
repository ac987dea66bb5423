"""Client implementations in a scenario: the schema's refusals, the mixed fleet's seeded
assignment, load's refusal, ``--clients`` parsing, the fleet host's slot numbering and
the comparison writer (from run folders written here)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bk_sim.engine import Event, LeafPlan, leaf_implementations, plan_leaves
from bk_sim.errors import PublishedClientError, ScenarioError
from bk_sim.report import ComparedRun, write_comparison
from bk_sim.scenario import Scenario, scenario_from_dict
from bk_sim.sim import FleetHost, prepare_implementations

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"name": "t", "leaves": {"count": 8}, "model": {"preset": "tiny"}}


def _scenario(**extra: Any) -> Scenario:
    data = json.loads(json.dumps(BASE))
    for key, value in extra.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return scenario_from_dict(data)


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            {"client__implementation": "notbranchkey"},
            ["client.implementation", "expected 'bk_sim' or a pip requirement", "notbranchkey"],
        ),
        ({"client__implementation": 3}, ["client.implementation", "expected a string"]),
        ({"leaves__implementations": {}}, ["leaves.implementations", "at least one"]),
        (
            {"leaves__implementations": {"bk_sim": 0.5, "branchkey==2.9.0": 0.4}},
            ["leaves.implementations", "sum to 1", "0.9"],
        ),
        (
            {"leaves__implementations": {"bk_sim": 1.5, "branchkey==2.9.0": -0.5}},
            ["leaves.implementations.bk_sim", "(0, 1]"],
        ),
        (
            {"leaves__implementations": {"bk_sim": 0.5, "numpy==1.0": 0.5}},
            ["leaves.implementations.numpy==1.0", "pip requirement of the published client"],
        ),
        (
            {"leaves__implementations": {"bk_sim": "half"}},
            ["leaves.implementations.bk_sim", "expected a number"],
        ),
        ({"leaves__implementations": ["bk_sim"]}, ["leaves.implementations", "a mapping"]),
        (
            {
                "client__implementation": "branchkey==2.9.0",
                "leaves__implementations": {"bk_sim": 1.0},
            },
            ["leaves.implementations", "both say which client", "give one"],
        ),
    ],
)
def test_implementation_schema_errors_say_what_and_where(
    extra: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ScenarioError) as err:
        _scenario(**extra)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_published_requirements_are_checked_before_pip_runs() -> None:
    """Refusals of bk_sim.published come first, in one line, with exit code 2."""
    for bad in ("branchkey", "branchkey>=3; rm -rf /", "branchkey @ https://example.org/x"):
        sc = _scenario(client__implementation=bad)
        with pytest.raises(PublishedClientError) as err:
            prepare_implementations(sc, lambda line: None, cache_dir=Path("/nonexistent/x"))
        assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_the_default_is_our_client_and_plans_do_not_change() -> None:
    sc = _scenario()
    assert sc.client.implementation == "bk_sim" and sc.leaves.implementations is None
    creds = [{"id": f"L{i}"} for i in range(8)]
    plans = plan_leaves(sc, creds)
    assert {p.implementation for p in plans} == {"bk_sim"}
    mixed = _scenario(leaves__implementations={"bk_sim": 0.5, "branchkey==2.9.0": 0.5})
    again = plan_leaves(mixed, creds)
    # The fleet's draw has its own random stream: weightings and schedules are unchanged.
    assert [p.weighting for p in again] == [p.weighting for p in plans]
    assert [p.start_delay_s for p in again] == [p.start_delay_s for p in plans]


def test_mixed_fleet_counts_are_exact_and_the_assignment_is_seeded() -> None:
    mix = {"bk_sim": 0.5, "branchkey==2.9.0": 0.25, "branchkey==3.0.1": 0.25}
    a = leaf_implementations(_scenario(leaves__implementations=mix))
    assert Counter(a) == {"bk_sim": 4, "branchkey==2.9.0": 2, "branchkey==3.0.1": 2}
    assert a == leaf_implementations(_scenario(leaves__implementations=mix))
    others = {
        tuple(leaf_implementations(_scenario(seed=s, leaves__implementations=mix)))
        for s in range(1, 6)
    }
    assert len(others | {tuple(a)}) > 1, "the seed must decide who runs what"
    # Largest remainder: 7 leaves at 1/3 each are 3/2/2, never 2/2/2 or 3/3/3.
    thirds = {"bk_sim": 1 / 3, "branchkey==2.9.0": 1 / 3, "branchkey==3.0.1": 1 / 3}
    seven = leaf_implementations(_scenario(leaves={"count": 7}, leaves__implementations=thirds))
    assert sorted(Counter(seven).values()) == [2, 2, 3]


@pytest.mark.parametrize(
    "setting",
    [
        "client.implementation=branchkey==2.9.0",
        "leaves.implementations={bk_sim: 0.5, 'branchkey==3.0.1': 0.5}",
    ],
)
def test_load_refuses_a_published_client_naming_why(setting: str, tmp_path: Path) -> None:
    """Through the CLI: importing the load package's run module imports Locust (gevent)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bk_sim.cli",
            "load",
            str(ROOT / "scenarios" / "load_smoke.yaml"),
            "--set",
            setting,
            "--set",
            f"report.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "bk-sim load cannot drive branchkey==" in last and "bk-sim run or bk-sim chaos" in last
    assert "Traceback" not in proc.stderr and not list(tmp_path.iterdir())


def test_clients_option_refuses_empty_and_repeated_names() -> None:
    from bk_sim.cli._compare_clients import parse_clients

    assert parse_clients("bk_sim, branchkey==2.9.0") == ["bk_sim", "branchkey==2.9.0"]
    with pytest.raises(ScenarioError, match="none empty"):
        parse_clients("bk_sim,,branchkey==2.9.0")
    with pytest.raises(ScenarioError, match="given twice"):
        parse_clients("bk_sim,bk_sim")


class _FakeHost:
    """A LeafHost with fixed slots, recording what it is asked to do."""

    def __init__(self, slots: dict[int, list[int]], events: list[Event]) -> None:
        self.slots = slots
        self.events = events
        self.killed: list[int] = []
        self.restarted: list[tuple[int, int]] = []

    def start(self) -> None: ...

    def next_event(self, timeout: float) -> Event | None:
        return self.events.pop(0) if self.events else None

    def emit(self, event: Any) -> None:
        self.events.append(dict(event))

    def running(self) -> bool:
        return bool(self.events)

    def signal_stop(self) -> None: ...

    def stop(self, sink: Callable[[Event], None]) -> None: ...

    def worker_of(self, leaf_index: int) -> int:
        for w, leaves in self.slots.items():
            if leaf_index in leaves:
                return w
        raise KeyError(leaf_index)

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        return [
            LeafPlan(index=i, credentials={"id": str(i)}, weighting=1.0) for i in self.slots[worker]
        ]

    def kill(self, worker: int) -> int | None:
        self.killed.append(worker)
        return 100 + worker

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> None:
        self.restarted.append((worker, first_round))


def test_fleet_host_numbers_slots_across_hosts_and_merges_events() -> None:
    ours = _FakeHost({0: [0, 2], 1: [4]}, [{"kind": "a", "leaf": 0}])
    theirs = _FakeHost({0: [1, 3]}, [{"kind": "b", "leaf": 1}, {"kind": "c", "leaf": 3}])
    fleet = FleetHost([(ours, 2), (theirs, 1)])
    assert [fleet.worker_of(i) for i in range(5)] == [0, 2, 0, 2, 1]
    assert [p.index for p in fleet.leaves_of(2)] == [1, 3]
    assert fleet.kill(2) == 100 and theirs.killed == [0] and not ours.killed
    fleet.restart(1, 3, frozenset())
    assert ours.restarted == [(1, 3)]
    with pytest.raises(KeyError):
        fleet.worker_of(9)
    got = []
    while (e := fleet.next_event(0.0)) is not None:
        got.append(e["kind"])
    assert sorted(got) == ["a", "b", "c"] and got.index("b") < got.index("c")


def _fake_run(folder: Path, *, lost: int, checks: list[bool], events: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    results = {
        "passed": all(checks),
        "verdict": "x",
        "run": {"duration_s": 12.0},
        "checks": [{"name": f"c{i}", "passed": ok, "message": "m"} for i, ok in enumerate(checks)],
        "notifications": {
            "expected": 4,
            "received": 4 - lost,
            "lost": lost,
            "duplicates": 0,
            "lost_examples": [{"leaf_id": "L1", "aggregation_id": "A2"}] * lost,
        },
        "implementations": {
            "branchkey==2.9.0": {"unobservable": [{"what": "amqp_acks", "why": "pika"}]}
        },
    }
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return folder


def test_comparison_rows_say_what_differed_with_event_line_evidence(tmp_path: Path) -> None:
    ours = _fake_run(
        tmp_path / "a",
        lost=0,
        checks=[True, True],
        events=[
            {"kind": "run_started", "t": 100.0},
            {"kind": "leaf_started", "t": 101.0, "leaf": 1, "leaf_id": "L1"},
        ],
    )
    theirs = _fake_run(
        tmp_path / "b",
        lost=1,
        checks=[True, False],
        events=[
            {"kind": "run_started", "t": 200.0},
            {"kind": "leaf_started", "t": 201.0, "leaf": 1, "leaf_id": "L1"},
            {"kind": "consumer_stopped", "t": 203.5, "leaf": 1, "leaf_id": "L1", "error": "gone"},
        ],
    )
    path = write_comparison(
        tmp_path / "cmp",
        [
            ComparedRun("bk_sim", ours, 0),
            ComparedRun("branchkey==2.9.0", theirs, 1),
            ComparedRun("branchkey==3.0.1", None, 2, "transport refused"),
        ],
    )
    doc = json.loads(path.read_text())
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["checks passed"]["values"] == {
        "bk_sim": "2/2",
        "branchkey==2.9.0": "1/2",
        "branchkey==3.0.1": None,
    }
    assert rows["checks passed"]["differs"]
    lost = rows["notifications lost"]
    assert lost["differs"] and lost["values"]["branchkey==2.9.0"] == 1
    assert "branchkey==2.9.0: 1 of 4 owed" in lost["what_differed"]
    evidence = lost["evidence"]["branchkey==2.9.0"]
    assert any(
        line.startswith("events.jsonl:3 +3.50s consumer_stopped leaf 1") for line in evidence
    ), evidence
    assert not rows["wall time"]["differs"]
    assert rows["errors"]["values"]["branchkey==2.9.0"] == 1
    assert doc["runs"]["branchkey==3.0.1"]["error"] == "transport refused"
    assert doc["unobservable"]["branchkey==2.9.0"][0]["what"] == "amqp_acks"
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert (
        "<th>branchkey==3.0.1</th>" in page and "amqp_acks" in page and "transport refused" in page
    )


def test_published_slots_spread_each_implementation_and_give_dying_leaves_their_own() -> None:
    from bk_sim.sim._published_host import published_slots

    def plan(i: int, impl: str, die: int | None = None) -> LeafPlan:
        return LeafPlan(
            index=i, credentials={"id": f"L{i}"}, weighting=1.0, die_round=die, implementation=impl
        )

    plans = [
        plan(0, "branchkey==2.9.0"),
        plan(1, "branchkey==2.9.0"),
        plan(2, "branchkey==2.9.0", die=2),
        plan(3, "branchkey==3.0.1"),
        plan(4, "branchkey==2.9.0"),
    ]
    slots = published_slots(plans, processes=2)
    got = [(s.worker, s.implementation, [p.index for p in s.plans], s.dies) for s in slots]
    assert got == [
        (0, "branchkey==2.9.0", [0, 4], False),
        (1, "branchkey==2.9.0", [1], False),
        (2, "branchkey==2.9.0", [2], True),
        (3, "branchkey==3.0.1", [3], False),
    ]


def test_leaf_settings_fit_the_published_config_fields() -> None:
    from bk_sim.sim._published_host import leaf_settings

    sc = _scenario(client={"retry": {"total_timeout": 2.5}, "reconnect": {"max_delay": 4.5}})
    amqp = leaf_settings(sc, "http://127.0.0.1:9", "amqp", "127.0.0.1", 15672).to_command()
    assert amqp["rabbitmq"] == {
        "host": "127.0.0.1",
        "port": 15672,
        "ssl": False,
        "max_reconnect_attempts": 10,
        "reconnect_backoff_factor": 2.0,
        "reconnect_max_delay": 5,
    }
    assert amqp["retry"] == {"max_retries": 3, "backoff_factor": 1.0, "total_timeout": 3}
    assert amqp["api"] == {"host": "http://127.0.0.1:9", "ssl": False}
    ws = leaf_settings(sc, "http://127.0.0.1:9", "websocket", None, None).to_command()
    assert "rabbitmq" not in ws and ws["websocket"]["reconnect_max_delay"] == 5
