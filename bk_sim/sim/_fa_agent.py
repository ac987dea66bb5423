"""A leaf of a federated-analytics run: each round it uploads its site's statistics.

Same life as ``LeafAgent`` (upload, await the notification, download) but the upload is
the site's synthetic table reduced to an FA archive: every column's bundle plus the custom
``save_fields`` entries (``bk_sim.synth.site_payload``), written with the client's
``save_fields(..., kind="federated_analytics")``. The site is the leaf's index, and its
values are redrawn per round, so the judge regenerates exactly what was sent.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bk_sim import weights
from bk_sim.analytics import PAYLOAD_KIND_FEDERATED_ANALYTICS
from bk_sim.sim._agent import LeafAgent
from bk_sim.synth import TabularSpec, site_payload

#: What an FA archive carries as ``weighting`` (nothing reads it) and the platform records.
FA_WEIGHTING = 0.0


class AnalyticsLeafAgent(LeafAgent):
    """Plays an analytics scenario's rounds for one leaf (site = the leaf's index)."""

    def __init__(self, *args: Any, tabular: TabularSpec, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tabular = tabular

    def _upload(self, round_index: int) -> float:
        begun = time.time()
        t0 = time.thread_time()
        fields = site_payload(self._tabular, self.plan.index, round_index)
        t1 = time.thread_time()
        path = Path(
            self.client.save_fields(
                fields,
                kind=PAYLOAD_KIND_FEDERATED_ANALYTICS,
                file_path=self._dir / f"leaf{self.plan.index}-r{round_index}",
            )
        )
        data = path.read_bytes()
        t2 = time.thread_time()
        w2 = time.perf_counter()
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
            digest=weights.digest_header(data),
            weighting=FA_WEIGHTING,
            payload_kind=PAYLOAD_KIND_FEDERATED_ANALYTICS,
            field_count=len(fields),
            base_aggregation_id=None,
            bytes=len(data),
            begun=begun,
            generate_cpu_s=t1 - t0,
            encode_cpu_s=t2 - t1,
            duration_s=t3 - w2,
        )
        return time.time()

    def _download(self, round_index: int, aggregation_id: str) -> None:
        t0 = time.perf_counter()
        path = Path(self.client.file_download(aggregation_id))
        data = path.read_bytes()
        duration = time.perf_counter() - t0
        self._event(
            "download",
            round=round_index,
            aggregation_id=aggregation_id,
            digest=weights.digest_header(data),
            bytes=len(data),
            duration_s=duration,
        )
        self._cache.keep(aggregation_id, path)
