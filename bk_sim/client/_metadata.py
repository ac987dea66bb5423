"""The upload metadata JSON (PROTOCOL.md section 2; FEDERATED-ANALYTICS.md for ``kind``)."""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from typing import Any

import bk_sim
from bk_sim.analytics import PAYLOAD_KINDS
from bk_sim.errors import ClientConfigError


def get_metadata(
    include_timestamp: bool = True,
    file_size: int | None = None,
    file_digest: str | None = None,
    kind: str | None = None,
    device_info: Any = None,
    training_stats: Any = None,
    custom: Any = None,
) -> str:
    """The metadata JSON string an upload carries; ``None`` arguments are left out.

    Positions are branchkey 3.0.1's. 2.9.0 had ``device_info`` where ``kind`` now is:
    a non-string there is refused with a message saying so, rather than sent as a kind.
    """
    meta = metadata_dict(
        include_timestamp=include_timestamp,
        file_size=file_size,
        file_digest=file_digest,
        kind=kind,
        device_info=device_info,
        training_stats=training_stats,
        custom=custom,
    )
    return json.dumps(meta, ensure_ascii=False)


def metadata_dict(
    *,
    include_timestamp: bool = True,
    file_size: int | None = None,
    file_digest: str | None = None,
    kind: str | None = None,
    device_info: Any = None,
    training_stats: Any = None,
    custom: Any = None,
    timestamp: _dt.datetime | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``get_metadata`` as a dict; the keys this function sets win over ``extra``."""
    if kind is not None and (not isinstance(kind, str) or kind not in PAYLOAD_KINDS):
        hint = (
            " (branchkey 2.9.0 took device_info in this position: pass device_info=...)"
            if isinstance(kind, Mapping)
            else ""
        )
        raise ClientConfigError(
            f"kind must be None or one of {', '.join(PAYLOAD_KINDS)}, got {kind!r:.80}{hint}"
        )
    meta: dict[str, Any] = dict(extra or {})
    meta["client_version"] = bk_sim.__version__
    if include_timestamp:
        when = timestamp or _dt.datetime.now(_dt.timezone.utc)
        meta["timestamp"] = when.isoformat()
    for key, value in (
        ("file_size", file_size),
        ("file_digest", file_digest),
        ("kind", kind),
        ("device_info", device_info),
        ("training_stats", training_stats),
        ("custom", custom),
    ):
        if value is not None:
            meta[key] = value
    return meta
