"""Deterministic synthetic data, regenerated from a few integers.

Leaf weights (``leaf_update`` and friends) and tabular columns for federated analytics
(``TabularSpec`` and the ``site_*`` functions) are pure functions of the scenario's seed
and a leaf's index, so leaves generate them and the judge regenerates them. Used by the
simulation's leaves, the load payloads, the validator's benchmark and the judge, so it
sits below all of them.
"""

from bk_sim.synth._model import (
    SharedDraws,
    initial_model,
    leaf_update,
    leaf_update_chunks,
    leaf_weightings,
)
from bk_sim.synth._tabular import (
    COLUMN_KINDS,
    TabularSpec,
    column_names,
    field_ops,
    site_bundle,
    site_columns,
    site_fields,
    site_payload,
    site_rows,
    tabular_spec,
)

__all__ = [
    "COLUMN_KINDS",
    "SharedDraws",
    "TabularSpec",
    "column_names",
    "field_ops",
    "initial_model",
    "leaf_update",
    "leaf_update_chunks",
    "leaf_weightings",
    "site_bundle",
    "site_columns",
    "site_fields",
    "site_payload",
    "site_rows",
    "tabular_spec",
]
