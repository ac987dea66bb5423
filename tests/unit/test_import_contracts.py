"""The import contracts in pyproject.toml hold for bk_sim, and really catch what they are for:
another package's private module, and a layer importing upwards (a package cycle)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.private_modules import PrivateModulesContract

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
_TYPES: dict[str, Any] = {
    "layers": LayersContract,
    "private_modules": PrivateModulesContract,
    "forbidden": ForbiddenContract,
}


def _contracts() -> list[Any]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    session = {"root_packages": [config["root_package"]]}
    out = []
    for c in config["contracts"]:
        options = {k: v for k, v in c.items() if k not in ("name", "type")}
        out.append(_TYPES[c["type"]](c["name"], session, options))
    return out


@pytest.fixture()
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("bk_sim")  # cached on disk by grimp: fast after the first


def _broken(graph: grimp.ImportGraph) -> list[str]:
    return [c.name for c in _contracts() if not c.check(graph, verbose=False).kept]


def test_every_contract_holds_for_bk_sim(graph: grimp.ImportGraph) -> None:
    assert _broken(graph) == []


def test_importing_another_packages_private_module_breaks_a_contract(
    graph: grimp.ImportGraph,
) -> None:
    g = graph
    g.add_import(
        importer="bk_sim.load._payloads",
        imported="bk_sim.synth._model",
        line_number=1,
        line_contents="from bk_sim.synth._model import leaf_update",
    )
    assert _broken(g) == ["no package imports another package's private module"]


def test_a_lower_layer_importing_a_higher_one_breaks_the_layers(graph: grimp.ImportGraph) -> None:
    g = graph
    g.add_import(  # the old validate -> sim cycle
        importer="bk_sim.validate",
        imported="bk_sim.sim",
        line_number=1,
        line_contents="from bk_sim.sim import SimulationRun",
    )
    assert _broken(g) == ["layers: higher may import lower, never the other way"]
