"""The scenario schema as one Markdown table, rendered from the dataclasses.

The README's "Scenarios" table is this function's output (a unit test keeps them equal), so
keys, types, defaults and meanings are written once, next to the fields in ``_spec.py``.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from bk_sim.scenario._loader import _hints, _inner, _range_text, _type_name
from bk_sim.scenario._spec import ModelSpec, Scenario

_DEFAULT_NOTES = {
    "name": "the file's stem",
    "leaves.processes": "null",
    "model.layers": "(or `preset`)",
    "model.preset": "(or `layers`)",
}


def scenario_schema_doc() -> str:
    """Every scenario key with its type (and range), default and meaning, as Markdown."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    _rows(Scenario, "", rows)
    return "\n".join(rows) + "\n"


def _rows(cls: type, prefix: str, rows: list[str]) -> None:
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = _inner(tp)
        doc = f.metadata.get("doc", "")
        if isinstance(inner, type) and dataclasses.is_dataclass(inner) and inner is not ModelSpec:
            rows.append(f"| `{key}` | mapping | | {doc} |")
            _rows(inner, key + ".", rows)
            continue
        if inner is ModelSpec:
            rows.append(f"| `{key}` | mapping | required | {doc}: `preset` or `layers` |")
            _rows(ModelSpec, key + ".", rows)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            rows.append(f"| `{key}` | list of mappings | {_default(f, key)} | {doc} |")
            _rows(item, key + "[].", rows)
            continue
        type_text = _type_name(tp).removeprefix("a ").removeprefix("an ")
        limits = _range_text(f.metadata)
        if limits:
            type_text += f", {limits}"
        rows.append(f"| `{key}` | {type_text} | {_default(f, key)} | {doc} |")


def _default(f: dataclasses.Field[Any], key: str) -> str:
    if key in _DEFAULT_NOTES:
        return _DEFAULT_NOTES[key]
    if f.default is dataclasses.MISSING:
        return "required" if f.default_factory is dataclasses.MISSING else ""
    value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "`[]`" if not value else str(list(value))
    if isinstance(value, Path):
        return str(value)
    return str(value)
