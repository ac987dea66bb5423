"""Where federated analytics meets the round state machine of ``_rounds``.

A round's kind is stored in its signature (``{"kind": "federated_analytics"}``; a
learning round's signature is its layer layout). The run's field schema is frozen by the
first FA upload of the run and kept in the store; each FA round keeps the must_match
values of its first upload and, once combined, its result (fields and derived statistics).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any

from bk_sim.errors import BkSimError
from bk_sim.platform._analytics import (
    FEDERATED_ANALYTICS,
    FieldsInfo,
    aggregate_to_file,
    check_upload,
    freeze_schema,
    must_match_reference,
)
from bk_sim.platform._faults import BranchFaults
from bk_sim.platform._store import Store, new_id
from bk_sim.weights import WeightsInfo

log = logging.getLogger(__name__)

#: What an FA round's record says its strategy is.
FA_STRATEGY = "field_ops"


def round_signature(_info: FieldsInfo) -> dict[str, Any]:
    return {"kind": FEDERATED_ANALYTICS}


def is_analytics_round(row: dict[str, Any]) -> bool:
    import json

    signature = json.loads(row["signature"])
    return isinstance(signature, dict) and signature.get("kind") == FEDERATED_ANALYTICS


def check_round_kind(signature: Any, info: WeightsInfo | FieldsInfo) -> bool:
    """True when the upload is of the round's kind (the kind of its first upload)."""
    round_is_fa = isinstance(signature, dict) and signature.get("kind") == FEDERATED_ANALYTICS
    return round_is_fa == isinstance(info, FieldsInfo)


def admit_analytics(
    store: Store, branch: dict[str, Any], accepting: dict[str, Any] | None, info: FieldsInfo
) -> dict[str, Any] | None:
    """Check an FA upload against the run's schema (freezing it on the run's first FA
    upload) and the round's must_match values; raises ``AnalyticsRefusal``.

    Returns the must_match reference to record when this upload opens a round, else None.
    """
    run_number = int(branch["run_number"])
    schema = store.fa_schema(branch["id"], run_number)
    fresh = schema is None
    if schema is None:
        schema = freeze_schema(info, store.field_ops(branch["id"]))
    reference = None
    if accepting is not None:
        reference = store.fa_round(branch["id"], accepting["round"])["reference"]
    check_upload(schema, info, reference)
    if fresh:
        store.set_fa_schema(branch["id"], run_number, schema)
        log.info(
            "branch %s run %d: FA schema frozen (%d fields)", branch["id"], run_number, len(schema)
        )
    return must_match_reference(schema, info) if accepting is None else None


async def aggregate_analytics(
    store: Store,
    executor: Executor,
    branch: dict[str, Any],
    row: dict[str, Any],
    faults: BranchFaults | None,
    max_decompressed_bytes: int | None,
) -> bool:
    """Combine a closed FA round into an aggregate file; False when the round failed."""
    branch_id, number = branch["id"], row["round"]
    fault = faults.analytics if faults is not None else None
    uploads = [
        (u["leaf_id"], store.file_path(u["file_id"]))
        for u in store.active_uploads(branch_id, number)
    ]
    schema = store.fa_schema(branch_id, int(row["run_number"]))
    record_fault: dict[str, Any] = {
        "aggregation": None,
        "analytics": fault,
        "victim_leaf_id": None,
        "victim_field": None,
    }
    try:
        if schema is None:
            raise BkSimError(f"no FA schema for run {row['run_number']}")
        aggregation_id = new_id()
        target = store.file_path(aggregation_id)
        size, result, combined = await asyncio.get_running_loop().run_in_executor(
            executor,
            aggregate_to_file,
            uploads,
            schema,
            fault,
            max_decompressed_bytes,
            target,
        )
        store.add_file(aggregation_id, branch_id, "aggregate", size, None)
    except Exception as exc:  # a failed round is recorded, never half-done
        if isinstance(exc, (BkSimError, OSError, ValueError)):
            log.error("branch %s FA round %d failed: %s", branch_id, number, exc)
        else:
            log.exception("branch %s FA round %d failed", branch_id, number)
        store.update_round(
            branch_id,
            number,
            status="failed",
            strategy=FA_STRATEGY,
            error=str(exc),
            fault=record_fault,
        )
        return False
    record_fault["victim_leaf_id"] = combined.victim_leaf_id
    record_fault["victim_field"] = combined.victim_field
    store.set_fa_round(branch_id, number, result=result)
    store.update_round(
        branch_id,
        number,
        status="aggregated",
        strategy=FA_STRATEGY,
        aggregation_id=aggregation_id,
        fault=record_fault,
    )
    log.info("branch %s FA round %d combined into %s", branch_id, number, aggregation_id)
    return True
