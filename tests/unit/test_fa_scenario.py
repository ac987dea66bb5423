"""``payload.kind: federated_analytics`` scenarios: the schema, its checks, the FA files."""

from __future__ import annotations

from pathlib import Path

import pytest

from bk_sim.errors import ScenarioError
from bk_sim.scenario import load_scenario, scenario_from_dict

ROOT = Path(__file__).resolve().parents[2]
BASE = {"name": "t", "leaves": {"count": 2}, "transport": "websocket"}


def test_fa_scenario_files_load() -> None:
    smoke = load_scenario(ROOT / "scenarios" / "fa_smoke.yaml")
    assert smoke.payload.kind == "federated_analytics"
    assert smoke.payload.tabular.columns == 6 and smoke.payload.tabular.nan_fraction == 0.1
    big = load_scenario(ROOT / "scenarios" / "fa_100_sites.yaml")
    assert (big.leaves.count, big.payload.tabular.columns) == (100, 20)
    faulty = load_scenario(
        ROOT / "scenarios" / "fa_smoke.yaml", ["platform.faults.analytics=nan_poisoned"]
    )
    assert faulty.platform.faults.analytics == "nan_poisoned"


def test_learning_is_the_default_kind_and_analytics_needs_no_model() -> None:
    fl = scenario_from_dict({**BASE, "model": {"preset": "tiny"}})
    assert fl.payload.kind == "federated_learning"
    fa = scenario_from_dict({**BASE, "payload": {"kind": "federated_analytics"}})
    assert fa.model.preset == "tiny"  # filled in: nothing is trained


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (
            {
                "payload": {"kind": "federated_analytics"},
                "platform": {"faults": {"aggregation": "drop_leaf"}},
            },
            "platform.faults.aggregation",
        ),
        (
            {"model": {"preset": "tiny"}, "platform": {"faults": {"analytics": "drop_leaf"}}},
            "platform.faults.analytics",
        ),
        (
            {"payload": {"kind": "federated_analytics", "tabular": {"nan_fraction": 0.6}}},
            "payload.tabular.nan_fraction",
        ),
        (
            {
                "payload": {
                    "kind": "federated_analytics",
                    "tabular": {"rows_min": 100, "rows_median": 10},
                }
            },
            "payload.tabular",
        ),
        ({"model": {"preset": "tiny"}, "payload": {"kind": "statistics"}}, "payload.kind"),
    ],
)
def test_wrong_fa_settings_are_refused_naming_the_key(
    extra: dict[str, object], needle: str
) -> None:
    with pytest.raises(ScenarioError, match=needle.replace(".", r"\.")):
        scenario_from_dict({**BASE, **extra})
