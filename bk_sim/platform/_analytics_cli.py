"""``--field-op NAME=OP`` of ``bk-sim platform create-branch`` (federated analytics)."""

from __future__ import annotations

import click

from bk_sim.platform._analytics import check_field_ops


def parse_field_ops(values: tuple[str, ...]) -> dict[str, str]:
    """``("age_p90=max", ...)`` -> ``{"age_p90": "max"}``; a bad entry is a usage error."""
    raw: dict[str, str] = {}
    for value in values:
        name, sep, op = value.partition("=")
        if not sep or not name.strip() or not op.strip():
            raise click.BadParameter(f"{value!r} is not NAME=OP", param_hint="--field-op")
        if name.strip() in raw:
            raise click.BadParameter(f"field {name.strip()!r} given twice", param_hint="--field-op")
        raw[name.strip()] = op.strip()
    try:
        return check_field_ops(raw)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--field-op") from exc
