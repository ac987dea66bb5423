"""The round state machine of PROTOCOL.md section 7.

A round opens on the first upload after the previous one closed. It closes when every
leaf of the branch has uploaded, or when ``round_timeout_s`` has passed with at least
``quorum`` uploads (a timeout under quorum keeps the round open until quorum is reached).
A closed round is aggregated off the event loop, the aggregate stored as a new file, and
one ``aggregation_status`` published to the branch's leaves.

All decisions for one branch happen under that branch's lock, against rows that are
committed before the answer goes out, so a restart resumes exactly: open rounds keep their
uploads and get their timeouts re-armed, and a closed round whose aggregation was cut off
is aggregated again.

A round never stalls: a leaf may replace its own upload while the round is open (also the
one that fixed the round's layout, as long as no other leaf's upload holds it), and a
``start`` of a new run abandons the previous run's open round with its reason recorded.
Retries (PROTOCOL.md section 7): an upload whose digest equals the leaf's stored upload in
the same round is that upload. Across a round boundary a resend is a retry only when it
repeats the upload that completed the previous round, or an upload whose answer never
reached the leaf (the platform records when a 201 was written; one dropped by a fault or
a hang-up was not): an upload the leaf was told about and sends again after the round
closed is its upload for the next round.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bk_sim.errors import BkSimError, PlatformError
from bk_sim.platform._aggregate import Upload, apply_bug
from bk_sim.platform._analytics import AnalyticsRefusal, FieldsInfo
from bk_sim.platform._analytics_rounds import (
    admit_analytics,
    aggregate_analytics,
    check_round_kind,
    is_analytics_round,
    round_signature,
)
from bk_sim.platform._chunked import aggregate_to_file as aggregate_chunked
from bk_sim.platform._faults import BranchFaults
from bk_sim.platform._notify import Notifier, message
from bk_sim.platform._store import Leaf, Store, new_id, now_iso, parse_iso
from bk_sim.weights import WeightsInfo

log = logging.getLogger(__name__)

SHUTDOWN_WAIT_S = 30.0
#: How long after a round closed an identical upload still counts as a retry into it
#: (longer than the client's whole retry schedule with its default 30 s timeouts).
RETRY_WINDOW_S = 150.0


class RequestRejected(PlatformError):
    """A leaf request the platform refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _signature(info: WeightsInfo) -> list[Any]:
    return [[list(s) for s in info.shapes], list(info.dtypes)]


def _check_signature(expected: list[Any], info: WeightsInfo) -> None:
    shapes, dtypes = expected
    if info.layer_count != len(shapes):
        raise RequestRejected(
            400,
            f"upload has {info.layer_count} layers; this round's uploads have {len(shapes)}",
        )
    for i, (shape, dtype) in enumerate(zip(info.shapes, info.dtypes, strict=True)):
        if list(shape) != shapes[i]:
            raise RequestRejected(
                400,
                f"layer_{i} has shape {tuple(shape)}; this round's uploads have {tuple(shapes[i])}",
            )
        if dtype != dtypes[i]:
            raise RequestRejected(
                400, f"layer_{i} has dtype {dtype}; this round's uploads have {dtypes[i]}"
            )


def _within_retry_window(row: dict[str, Any]) -> bool:
    """An open round, or one closed at most ``RETRY_WINDOW_S`` ago."""
    if row["closed_at"] is None:
        return True
    age = (datetime.now(timezone.utc) - parse_iso(row["closed_at"])).total_seconds()
    return age <= RETRY_WINDOW_S


def _aggregate_to_file(
    uploads: list[Upload],
    strategy: str,
    trim_fraction: float,
    max_decompressed_bytes: int | None,
    target: Path,
) -> int:
    """Runs in the aggregation executor: aggregate into the archive, return its size.

    Streams (``_chunked``): memory is one model's float64 sums, not N decoded uploads.
    """
    return aggregate_chunked(
        uploads,
        strategy,
        target,
        trim_fraction=trim_fraction,
        max_decompressed_bytes=max_decompressed_bytes,
    )


class RoundManager:
    """Owns the open rounds of every branch: uploads in, aggregates and notices out."""

    def __init__(
        self,
        store: Store,
        notifier: Notifier,
        faults_for: Callable[[str], BranchFaults | None],
        executor: Executor,
        *,
        max_decompressed_bytes: int | None,
    ) -> None:
        self._store = store
        self._notifier = notifier
        self._faults_for = faults_for
        self._executor = executor
        self._max_decompressed = max_decompressed_bytes
        self._locks: dict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
        self._timers: dict[tuple[str, int], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._branch_of: dict[asyncio.Task[None], str] = {}
        self._deleted: set[str] = set()

    # -- lifecycle
    async def resume(self) -> None:
        """After a (re)start: re-arm timeouts of open rounds, re-run cut-off aggregations."""
        for row in self._store.rounds_to_resume():
            branch_id, number = row["branch_id"], row["round"]
            if row["closed_at"] is not None:
                log.info("resuming aggregation of branch %s round %d", branch_id, number)
                self._spawn(self._aggregate(branch_id, number), branch_id)
                continue
            branch = self._store.branch(branch_id)
            if branch is None:
                continue
            async with self._locks[branch_id]:
                await self._maybe_close(branch, row)
                fresh = self._store.round_row(branch_id, number)
                if fresh is not None and fresh["closed_at"] is None and not fresh["timed_out"]:
                    self._arm_timer(branch, fresh)

    async def config_changed(self, branch_id: str) -> None:
        """Apply a new timeout or quorum to the branch's open round at once."""
        async with self._locks[branch_id]:
            branch = self._store.branch(branch_id)
            row = self._store.latest_round(branch_id)
            if branch is None or row is None or row["closed_at"] is not None:
                return
            handle = self._timers.pop((branch_id, row["round"]), None)
            if handle is not None:
                handle.cancel()
            if not await self._maybe_close(branch, row) and not row["timed_out"]:
                self._arm_timer(branch, row)

    async def run_started(self, branch_id: str, run_number: int) -> None:
        """A new run: the previous run's open round is abandoned (its uploads are stale)."""
        async with self._locks[branch_id]:
            reason = f"abandoned: run {run_number} started"
            for number, file_ids in self._store.abandon_open_rounds(branch_id, reason):
                handle = self._timers.pop((branch_id, number), None)
                if handle is not None:
                    handle.cancel()
                log.info("branch %s round %d %s", branch_id, number, reason)
                self._delete_files(file_ids)

    def forget_branches(self, branch_ids: list[str]) -> None:
        """Deleted branches: no timer fires, no aggregation writes a file or a row."""
        gone = set(branch_ids)
        self._deleted |= gone
        for key in [k for k in self._timers if k[0] in gone]:
            self._timers.pop(key).cancel()
        for task, branch_id in list(self._branch_of.items()):
            if branch_id in gone:
                task.cancel()

    def _delete_files(self, file_ids: list[str]) -> None:
        for file_id in file_ids:
            try:
                self._store.file_path(file_id).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete file %s: %s", file_id, exc)

    async def shutdown(self) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=SHUTDOWN_WAIT_S)

    def _spawn(self, coro: Any, branch_id: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if branch_id is not None:
            self._branch_of[task] = branch_id
            task.add_done_callback(lambda t: self._branch_of.pop(t, None))

    # -- uploads
    async def submit(
        self, leaf: Leaf, *, file_id: str, digest: str, size: int, info: WeightsInfo | FieldsInfo
    ) -> tuple[str, bool]:
        """Put a validated, already stored upload into the branch's round.

        Returns ``(file_id, is_new)``; ``is_new`` is False when the upload is a retry of
        one already counted (then the caller discards its copy).
        """
        assert info.weighting is not None
        async with self._locks[leaf.branch_id]:
            branch = self._store.branch(leaf.branch_id)
            if branch is None:
                raise RequestRejected(404, f"branch {leaf.branch_id} no longer exists")
            if branch["run_status"] != "start":
                raise RequestRejected(
                    409, f"the run is not started (run_status is {branch['run_status']!r})"
                )
            faults = self._faults_for(branch["id"])
            dedupe = faults.dedupe if faults is not None else True
            latest = self._store.latest_round(branch["id"])
            accepting = latest if latest is not None and latest["closed_at"] is None else None
            duplicate = self._find_retry(branch["id"], latest, leaf.id, digest)
            if duplicate is not None and dedupe:
                return duplicate["file_id"], False
            # -- FA hook: a round takes the kind of its first upload (docs/analytics.md)
            if accepting is not None and not check_round_kind(
                json.loads(accepting["signature"]), info
            ):
                raise RequestRejected(
                    400,
                    "federated analytics upload refused: round_kind_mismatch: the open round "
                    "takes the other payload kind (the kind of its first upload)",
                )
            if isinstance(info, FieldsInfo):
                try:
                    reference = admit_analytics(self._store, branch, accepting, info)
                except AnalyticsRefusal as exc:
                    raise RequestRejected(
                        400, f"federated analytics upload refused: {exc}"
                    ) from exc
            # -- end FA hook
            if accepting is None:
                signature: Any = (
                    round_signature(info) if isinstance(info, FieldsInfo) else _signature(info)
                )
                accepting = self._store.open_round(branch, signature)
                opened = True
            else:
                opened = False
                if isinstance(info, WeightsInfo):
                    signature = _signature(info)
                    if json.loads(
                        accepting["signature"]
                    ) != signature and self._store.only_uploader(
                        branch["id"], accepting["round"], leaf.id
                    ):
                        # The leaf replaces the upload that fixed the layout, and nobody else
                        # holds it: the replacement fixes the layout instead (else: stuck).
                        self._store.update_round(
                            branch["id"], accepting["round"], signature=json.dumps(signature)
                        )
                    else:
                        _check_signature(json.loads(accepting["signature"]), info)
            if isinstance(info, FieldsInfo) and reference is not None:  # FA hook
                self._store.set_fa_round(branch["id"], accepting["round"], reference=reference)
            same_in_round = duplicate is not None and duplicate["round"] == accepting["round"]
            retired = self._store.add_upload(
                file_id=file_id,
                branch_id=branch["id"],
                number=accepting["round"],
                leaf_id=leaf.id,
                digest=digest,
                weighting=info.weighting,
                size=size,
                replace=not same_in_round,  # dedupe off: an identical retry counts again
            )
            self._delete_files(retired)  # replaced: no round needs those bytes any more
            closed = await self._maybe_close(branch, accepting, closed_by=file_id)
            if opened and not closed:
                self._arm_timer(branch, accepting)
            return file_id, True

    def _find_retry(
        self, branch_id: str, latest: dict[str, Any] | None, leaf_id: str, digest: str
    ) -> dict[str, Any] | None:
        """The stored upload this one repeats, if PROTOCOL.md section 7 makes it a retry.

        In the open round: the leaf's own upload with the same digest. Across a round
        boundary (closed at most ``RETRY_WINDOW_S`` ago, and only while the leaf has not
        uploaded to the next round): the upload that completed the round, or the leaf's
        upload whose answer was never written to it.
        """
        if latest is None:
            return None
        if latest["closed_at"] is None:
            hit = self._store.find_upload(branch_id, latest["round"], leaf_id, digest)
            if hit is not None or latest["round"] == 1:
                return hit
            if self._store.leaf_uploaded(branch_id, latest["round"], leaf_id):
                return None
            previous = self._store.round_row(branch_id, latest["round"] - 1)
        else:
            previous = latest
        if previous is None or previous["closed_by"] is None:
            return None
        if not _within_retry_window(previous):
            return None
        hit = self._store.find_upload(branch_id, previous["round"], leaf_id, digest)
        if hit is None:
            return None
        if hit["file_id"] == previous["closed_by"] or not hit["acked"]:
            return hit
        return None

    # -- closing
    def _quorum(self, branch: dict[str, Any], leaves: int) -> int:
        quorum = branch["quorum"]
        if quorum is None:
            return max(leaves, 1)
        return max(1, min(int(quorum), max(leaves, 1)))

    async def _maybe_close(
        self, branch: dict[str, Any], row: dict[str, Any], *, closed_by: str | None = None
    ) -> bool:
        """Close the round if it is complete; ``closed_by``: the upload just added."""
        number = row["round"]
        uploaders = self._store.uploader_count(branch["id"], number)
        leaves = self._store.leaf_count(branch["id"])
        fresh = self._store.round_row(branch["id"], number)
        timed_out = bool(fresh and fresh["timed_out"])
        if leaves and uploaders >= leaves:
            reason = "all_uploaded"
        elif timed_out and uploaders >= self._quorum(branch, leaves):
            reason = "timeout_quorum"
        else:
            return False
        self._close(branch["id"], number, reason, closed_by)
        return True

    def _close(self, branch_id: str, number: int, reason: str, closed_by: str | None) -> None:
        handle = self._timers.pop((branch_id, number), None)
        if handle is not None:
            handle.cancel()
        self._store.update_round(
            branch_id, number, closed_at=now_iso(), close_reason=reason, closed_by=closed_by
        )
        log.info("branch %s round %d closed (%s)", branch_id, number, reason)
        self._spawn(self._aggregate(branch_id, number), branch_id)

    def _arm_timer(self, branch: dict[str, Any], row: dict[str, Any]) -> None:
        timeout = branch["round_timeout_s"]
        if timeout is None:
            return
        opened = parse_iso(row["opened_at"])
        elapsed = (datetime.now(timezone.utc) - opened).total_seconds()
        delay = max(0.0, float(timeout) - elapsed)
        key = (branch["id"], row["round"])
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(
            delay, lambda: self._spawn(self._on_timeout(*key), key[0])
        )

    async def _on_timeout(self, branch_id: str, number: int) -> None:
        self._timers.pop((branch_id, number), None)
        async with self._locks[branch_id]:
            row = self._store.round_row(branch_id, number)
            branch = self._store.branch(branch_id)
            if row is None or branch is None or row["closed_at"] is not None:
                return
            self._store.update_round(branch_id, number, timed_out=1)
            if not await self._maybe_close(branch, row):
                log.info("branch %s round %d timed out under quorum; waiting", branch_id, number)

    # -- aggregation
    async def _aggregate(self, branch_id: str, number: int) -> None:
        if branch_id in self._deleted:
            return
        branch = self._store.branch(branch_id)
        row = self._store.round_row(branch_id, number)
        if branch is None or row is None:
            return
        faults = self._faults_for(branch_id)
        if is_analytics_round(row):  # FA hook: its own combining, same notification
            ok = await aggregate_analytics(
                self._store, self._executor, branch, row, faults, self._max_decompressed
            )
            if ok:
                aggregated = self._store.round_row(branch_id, number)
                assert aggregated is not None
                leaf_ids = [leaf.id for leaf in self._store.leaves(branch_id)]
                text = message("aggregation_status", aggregation_id=aggregated["aggregation_id"])
                await self._notifier.notify(branch, leaf_ids, text, faults)
            return
        bug = faults.aggregation if faults is not None else None
        strategy = branch["strategy"]
        uploads = [
            Upload(u["leaf_id"], self._store.file_path(u["file_id"]), float(u["weighting"]))
            for u in self._store.active_uploads(branch_id, number)
        ]
        victim: str | None = None
        aggregation_id: str | None = None
        try:
            if bug == "stale":
                aggregation_id = self._store.previous_aggregate(branch_id, number)
            if aggregation_id is None:
                use, use_strategy = uploads, strategy
                if bug in ("unweighted", "drop_leaf", "double_count"):
                    use, use_strategy, victim_id = apply_bug(uploads, strategy, bug)
                    victim = victim_id or None  # "" means every leaf (unweighted)
                aggregation_id = new_id()
                target = self._store.file_path(aggregation_id)
                job = self._executor.submit(
                    _aggregate_to_file,
                    list(use),
                    use_strategy,
                    float(branch["trim_fraction"]),
                    self._max_decompressed,
                    target,
                )
                try:
                    size = await asyncio.wrap_future(job)
                except asyncio.CancelledError:
                    # The tree was deleted: a queued job never runs; a running one finishes
                    # and its file goes as soon as it is written.
                    job.cancel()
                    job.add_done_callback(lambda _: target.unlink(missing_ok=True))
                    raise
                if branch_id in self._deleted:
                    target.unlink(missing_ok=True)
                    log.info("branch %s deleted: round %d's aggregate discarded", branch_id, number)
                    return
                self._store.add_file(aggregation_id, branch_id, "aggregate", size, None)
        except Exception as exc:  # any failure ends the round as "failed", never half-done
            if isinstance(exc, (BkSimError, OSError, ValueError)):
                log.error("branch %s round %d aggregation failed: %s", branch_id, number, exc)
            else:
                log.exception("branch %s round %d aggregation failed", branch_id, number)
            self._store.update_round(
                branch_id,
                number,
                status="failed",
                strategy=strategy,
                error=str(exc),
                fault={"aggregation": bug, "victim_leaf_id": victim},
            )
            return
        self._store.update_round(
            branch_id,
            number,
            status="aggregated",
            strategy=strategy,
            aggregation_id=aggregation_id,
            fault={"aggregation": bug, "victim_leaf_id": victim},
        )
        log.info("branch %s round %d aggregated into %s", branch_id, number, aggregation_id)
        leaf_ids = [leaf.id for leaf in self._store.leaves(branch_id)]
        text = message("aggregation_status", aggregation_id=aggregation_id)
        await self._notifier.notify(branch, leaf_ids, text, faults)
