"""Deterministic synthetic data for runs.

Tabular columns for federated analytics (``TabularSpec`` and the ``site_*`` functions):
every site's raw columns and custom fields are a pure function of the spec and the site
index, so leaves generate them and the judge regenerates them.
"""

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
)

__all__ = [
    "COLUMN_KINDS",
    "TabularSpec",
    "column_names",
    "field_ops",
    "site_bundle",
    "site_columns",
    "site_fields",
    "site_payload",
    "site_rows",
]
