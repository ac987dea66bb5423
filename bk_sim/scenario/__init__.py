"""Scenarios: one YAML file (plus ``--set key.path=value`` overrides) -> one ``Scenario``.

``load_scenario`` validates once; every error is a ``ScenarioError`` naming the file (and
line, or the ``--set``), the key path, what was found and what was expected. The schema,
its defaults and its documentation live in ``_spec.py``; ``scenario_schema_doc()`` renders
them as the README table.
"""

from bk_sim.scenario._doc import scenario_schema_doc
from bk_sim.scenario._loader import load_scenario, parse_override, scenario_from_dict
from bk_sim.scenario._presets import PRESETS
from bk_sim.scenario._spec import (
    DTYPES,
    OWN_IMPLEMENTATION,
    PROXY_CHAOS,
    STRATEGIES,
    BrokerSpec,
    ChaosExpectSpec,
    ChaosFaultSpec,
    ChaosSpec,
    ClientSpec,
    DropoutsSpec,
    FaultsSpec,
    HttpFaultSpec,
    LayerSpec,
    LeavesSpec,
    LoadSpec,
    ModelSpec,
    NotificationFaultSpec,
    PayloadSpec,
    PlatformSpec,
    ReconnectSpec,
    ReportSpec,
    RetrySpec,
    Scenario,
    StragglersSpec,
    TimeoutsSpec,
    ValidationSpec,
    WeightingSpec,
)

__all__ = [
    "DTYPES",
    "OWN_IMPLEMENTATION",
    "PROXY_CHAOS",
    "PRESETS",
    "STRATEGIES",
    "BrokerSpec",
    "ChaosExpectSpec",
    "ChaosFaultSpec",
    "ChaosSpec",
    "ClientSpec",
    "DropoutsSpec",
    "FaultsSpec",
    "HttpFaultSpec",
    "LayerSpec",
    "LeavesSpec",
    "LoadSpec",
    "ModelSpec",
    "NotificationFaultSpec",
    "PayloadSpec",
    "PlatformSpec",
    "ReconnectSpec",
    "ReportSpec",
    "RetrySpec",
    "Scenario",
    "StragglersSpec",
    "TimeoutsSpec",
    "ValidationSpec",
    "WeightingSpec",
    "load_scenario",
    "parse_override",
    "scenario_from_dict",
    "scenario_schema_doc",
]
