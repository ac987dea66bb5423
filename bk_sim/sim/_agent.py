"""One simulated leaf's behaviour: train (synthetically), upload, await, download.

``LeafAgent`` knows nothing of processes or Locust: the simulation's workers and the
load generator's users both drive it. It talks to the platform only through
``bk_sim.client.Client`` and reports what it does as plain event dicts.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bk_sim import npzstream, weights
from bk_sim.engine import HarnessEvent, LeafPlan, make_harness_event
from bk_sim.errors import BkSimError
from bk_sim.scenario import ModelSpec
from bk_sim.synth import leaf_update, leaf_update_chunks

_log = logging.getLogger(__name__)

#: Where a leaf's events go (its worker turns them into the stream's dicts).
Emit = Callable[[HarnessEvent], None]


class NotificationQueue(Protocol):
    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next aggregation id; ``queue.Empty`` when none came within ``timeout``."""
        ...


class LeafClient(Protocol):
    """What a leaf plays its rounds through: ``bk_sim.client.Client``, or a published
    client driven in its own env (``bk_sim.sim._published_host``)."""

    @property
    def queue(self) -> NotificationQueue: ...

    def get_latest_aggregation_id(self) -> str | None: ...

    def file_upload(self, file_path: str | os.PathLike[str]) -> str: ...

    def file_download(self, file_id: str) -> str: ...

    def save_fields(
        self,
        entries: Mapping[str, Any],
        kind: str = ...,
        file_path: str | os.PathLike[str] = ...,
        weighting: float | None = None,
    ) -> str:
        """Write named fields as an archive of ``kind`` (analytics uploads); its path."""
        ...


class AggregateCache:
    """Aggregates by id, decoded once per process and shared by its leaves.

    The first copy downloaded of an aggregate is kept in ``keep_dir`` (the run folder),
    so the validator reads what the leaves received without downloading again.
    """

    def __init__(self, keep_dir: Path) -> None:
        self._dir = keep_dir
        self._layers: dict[str, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def keep(self, aggregation_id: str, downloaded: Path) -> Path:
        """Keep the first copy of an aggregate in the run folder (without decoding it:
        an analytics aggregate has no layers); later copies are deleted."""
        with self._lock:
            return self._keep(aggregation_id, downloaded)

    def _keep(self, aggregation_id: str, downloaded: Path) -> Path:
        kept = self._dir / f"{aggregation_id}.npz"
        if kept.exists():
            downloaded.unlink(missing_ok=True)
        else:
            # Leaves of other processes read ``kept`` as soon as it exists, and a move
            # from /tmp to another filesystem is a copy: copy beside it, then rename.
            part = kept.with_name(f".{kept.name}.{os.getpid()}.part")
            shutil.move(str(downloaded), part)
            os.replace(part, kept)
        return kept

    def add(self, aggregation_id: str, downloaded: Path) -> list[np.ndarray]:
        with self._lock:
            if aggregation_id in self._layers:
                downloaded.unlink(missing_ok=True)
                return self._layers[aggregation_id]
            kept = self._keep(aggregation_id, downloaded)
            layers = npzstream.load_layers(kept)  # decoded chunk by chunk (issue 17)
            for arr in layers:
                arr.flags.writeable = False
            self._layers[aggregation_id] = layers
            # Only the newest is needed as a base (a straggler keeps its own reference to
            # an older one): one decoded model per process, not three (issue 17).
            while len(self._layers) > 1:
                self._layers.pop(next(iter(self._layers)))
            return layers


class LeafAgent:
    """Plays the scenario's rounds for one leaf through a ``Client``."""

    def __init__(
        self,
        plan: LeafPlan,
        *,
        seed: int,
        model: ModelSpec,
        rounds: int,
        compression: weights.Compression,
        notification_timeout_s: float,
        client: LeafClient,
        work_dir: Path,
        cache: AggregateCache,
        emit: Emit,
        stop: threading.Event,
    ) -> None:
        self.plan = plan
        self._seed = seed
        self._model = model
        self._rounds = rounds
        self._compression = compression
        self._timeout = notification_timeout_s
        self.client = client
        self._dir = work_dir
        self._cache = cache
        self._emit = emit
        self._stop = stop
        self._base_id: str | None = None
        self._base: Sequence[np.ndarray] | None = None
        self._seen: set[str] = set(plan.known_aggregates)
        #: the leaf reached its ``die_round``: its host kills its process
        self.died = False

    def _event(self, kind: str, **fields: Any) -> None:
        plan = self.plan
        self._emit(make_harness_event(kind, leaf=plan.index, leaf_id=plan.leaf_id, **fields))

    def run(self) -> bool:
        """Play every round; False when the leaf stopped early (error, death or stop)."""
        for round_index in range(self.plan.first_round, self._rounds + 1):
            if self._stop.is_set():
                self._event("leaf_stopped", round=round_index, reason="run stopped")
                return False
            try:
                if not self.play_round(round_index):
                    return False
            except BkSimError as exc:
                self._event("leaf_error", round=round_index, error=str(exc))
                return False
        self._event("leaf_done", rounds=self._rounds)
        return True

    def play_round(self, round_index: int) -> bool:
        """One round; False when the leaf is gone (died, timed out, stopped)."""
        plan = self.plan
        if plan.die_round == round_index:
            # No goodbye: the client is not closed here. Its process is killed (SIGKILL)
            # once every leaf it hosts has died, so the platform and the broker see what
            # a crashed leaf looks like: connections that just drop.
            self._event("leaf_died", round=round_index, reason="dropout: its process dies")
            self.died = True
            return False
        uploaded_at: float | None = None
        if round_index in plan.skip_rounds:
            self._event("round_skipped", round=round_index, reason="dropout: skips this round")
        else:
            if plan.straggle_s > 0 and self._stop.wait(plan.straggle_s):
                return False
            uploaded_at = self._upload(round_index)
        aggregation_id = self._await_aggregate(round_index, uploaded_at)
        if aggregation_id is None:
            return False
        self._download(round_index, aggregation_id)
        return True

    def _upload(self, round_index: int) -> float:
        # CPU time of this thread: with many leaves per process, wall time would count
        # the other leaves' work too.
        begun = time.time()
        path = self._dir / f"leaf{self.plan.index}-r{round_index}.npz"
        t0 = time.thread_time()
        if self._compression == "faithful":  # byte for byte the published client's format
            layers = leaf_update(self._seed, self.plan.index, round_index, self._base, self._model)
            t1 = time.thread_time()
            data = weights.encode_weights(self.plan.weighting, layers, compression="faithful")
            del layers
            path.write_bytes(data)
            digest, size = weights.digest_header(data), len(data)
            del data
            t2 = time.thread_time()
        else:  # generated, encoded and hashed a chunk at a time (issue 17)
            t1, t2, digest, size = self._write_streaming(round_index, path, t0)
        w2 = time.perf_counter()
        # Whatever arrived before this upload cannot be this upload's aggregate.
        latest = self.client.get_latest_aggregation_id()
        if latest is not None:
            self._seen.add(latest)
        try:
            file_id = self.client.file_upload(path)
        finally:
            path.unlink(missing_ok=True)
        t3 = time.perf_counter()
        self._event(
            "upload",
            round=round_index,
            file_id=file_id,
            digest=digest,
            weighting=self.plan.weighting,
            base_aggregation_id=self._base_id,
            bytes=size,
            begun=begun,
            generate_cpu_s=t1 - t0,
            encode_cpu_s=t2 - t1,
            duration_s=t3 - w2,
        )
        return time.time()

    def _write_streaming(
        self, round_index: int, path: Path, t0: float
    ) -> tuple[float, float, str, int]:
        """Write this round's upload from generated chunks; (t1, t2, digest, size).

        Generating and encoding interleave here, so the split of their CPU time is
        measured per chunk (t1 - t0: generating, t2 - t1: encoding and writing).
        """
        chunks = leaf_update_chunks(
            self._seed, self.plan.index, round_index, self._base, self._model
        )
        generate = 0.0

        def timed(it: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
            nonlocal generate
            while True:
                c0 = time.thread_time()
                chunk = next(it, None)
                generate += time.thread_time() - c0
                if chunk is None:
                    return
                yield chunk

        with npzstream.NpzWriter(path, self._compression) as w:
            w.add_array(weights.WEIGHTING_KEY, np.array([self.plan.weighting], np.float64))
            for i, (layer, it) in enumerate(zip(self._model.layers, chunks, strict=True)):
                w.add(weights.layer_key(i), np.dtype(layer.dtype), tuple(layer.shape), timed(it))
        t2 = time.thread_time()
        return t0 + generate, t2, w.digest, w.size

    def _await_aggregate(self, round_index: int, uploaded_at: float | None) -> str | None:
        deadline = time.monotonic() + self._timeout
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._event(
                    "leaf_error",
                    round=round_index,
                    error=f"no aggregation notification within {self._timeout:g} s",
                )
                return None
            try:
                aggregation_id = self.client.queue.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if not self.take_notified(round_index, str(aggregation_id), uploaded_at):
                continue
            return str(aggregation_id)
        self._event("leaf_stopped", round=round_index, reason="run stopped")
        return None

    def take_notified(
        self, round_index: int, aggregation_id: str, uploaded_at: float | None
    ) -> bool:
        """A notified aggregation id: True (and ``aggregate_notified``) when it is this
        round's, False when the leaf has seen it already."""
        if aggregation_id in self._seen:
            return False
        self._seen.add(aggregation_id)
        latency = None if uploaded_at is None else time.time() - uploaded_at
        self._event(
            "aggregate_notified",
            round=round_index,
            aggregation_id=aggregation_id,
            latency_s=latency,
        )
        return True

    # The blocking steps, for a host that waits elsewhere (``_aio_worker``).
    def upload(self, round_index: int) -> float:
        return self._upload(round_index)

    def download(self, round_index: int, aggregation_id: str) -> None:
        self._download(round_index, aggregation_id)

    def emit_event(self, kind: str, **fields: Any) -> None:
        self._event(kind, **fields)

    def _download(self, round_index: int, aggregation_id: str) -> None:
        t0 = time.perf_counter()
        path = Path(self.client.file_download(aggregation_id))
        duration = time.perf_counter() - t0
        digest, size = npzstream.file_digest(path)  # streaming: never the whole file
        self._event(
            "download",
            round=round_index,
            aggregation_id=aggregation_id,
            digest=digest,
            bytes=size,
            duration_s=duration,
        )
        self._base = self._cache.add(aggregation_id, path)
        self._base_id = aggregation_id
