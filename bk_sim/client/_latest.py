"""``client.queue``: holds only the newest aggregation id (PROTOCOL.md section 4)."""

from __future__ import annotations

import queue
import threading


class LatestQueue(queue.Queue):  # type: ignore[type-arg]
    """A one-slot queue where a newer item replaces an unread older one.

    ``put`` never blocks, so the notification receiver can never stall on a consumer
    that does not read; ``get(block=True)`` blocks until an id arrives, as in the seed
    README. Built only on the public non-blocking calls (no ``mutex``/``not_empty``), so
    it also works where gevent has patched ``queue`` (Locust).
    """

    def __init__(self) -> None:
        super().__init__(maxsize=1)
        self._putting = threading.Lock()

    def put(self, item: str, block: bool = True, timeout: float | None = None) -> None:
        with self._putting:
            while True:
                try:
                    super().put(item, block=False)
                    return
                except queue.Full:
                    try:
                        super().get(block=False)  # drop the unread older id
                    except queue.Empty:
                        pass

    def put_nowait(self, item: str) -> None:
        self.put(item)
