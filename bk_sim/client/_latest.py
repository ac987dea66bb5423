"""``client.queue``: holds only the newest aggregation id (PROTOCOL.md section 4)."""

from __future__ import annotations

import queue


class LatestQueue(queue.Queue[str]):
    """A one-slot queue where a newer item replaces an unread older one.

    ``put`` never blocks, so the notification receiver can never stall on a consumer
    that does not read; ``get(block=True)`` blocks until an id arrives, as in the seed
    README.
    """

    def __init__(self) -> None:
        super().__init__(maxsize=1)

    def put(self, item: str, block: bool = True, timeout: float | None = None) -> None:
        with self.mutex:
            if self.queue:
                self.queue.clear()
                self.unfinished_tasks = max(0, self.unfinished_tasks - 1)
            self._put(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def put_nowait(self, item: str) -> None:
        self.put(item)
