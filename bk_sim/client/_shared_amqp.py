"""Many AMQP consumers on one pika ``IOLoop``: one thread per process, not one per leaf.

``AmqpConsumer`` runs its ``SelectConnection`` on a private ``IOLoop`` in a thread of its
own. A process hosting hundreds of leaves would then run hundreds of loops; here every
consumer made by one ``SharedAmqpLoop`` keeps its own connection, channel and queue (as
the contract wants: each leaf its own connection) but all live on one loop. Everything a
consumer does (connect, consume, back off, reconnect, heartbeats, give up) is
``AmqpConsumer``'s own code, unchanged; only starting and stopping differ: ``start``
schedules the first connect on the shared loop, and a consumer that is done (closed or
given up) marks itself done instead of stopping the loop the others share.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pika.adapters.select_connection import IOLoop

from bk_sim.client._amqp import TRANSPORT, AmqpConsumer
from bk_sim.client._consumer import ConsumerSpec, NotificationConsumer

_log = logging.getLogger("bk_sim.client.amqp")


#: Connections of one loop in their TCP + AMQP handshake at once. Hundreds opening at
#: once on one thread outlast the broker's handshake timeout (10 s) on a busy machine; the
#: rest wait their turn (on the loop, no thread), then connect as ``AmqpConsumer`` does.
MAX_OPENING = 32


class SharedAmqpLoop:
    """One pika ``IOLoop`` on one daemon thread; ``factory`` makes consumers on it."""

    def __init__(self, name: str = "bk-amqp-shared", max_opening: int = MAX_OPENING) -> None:
        self.ioloop = IOLoop()
        self._max_opening = max_opening
        self._opening = 0
        self._waiting: deque[SharedLoopAmqpConsumer] = deque()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A callback that raises would end ``start()`` for every consumer on the loop:
        # log it and go on serving the others.
        while not self._stopped.is_set():
            try:
                self.ioloop.start()
            except AssertionError:
                # pika 1.4 asserts out of the loop when a connection is closed during its
                # handshake (see AmqpConsumer._run); that connection is closed by then.
                _log.debug("pika asserted while a connection was aborted", exc_info=True)
            except Exception:  # noqa: BLE001 - one consumer's bug must not stop all
                _log.exception("a callback on the shared AMQP loop failed; loop goes on")
        self.ioloop.close()

    def call(self, fn: Callable[[], None]) -> None:
        self.ioloop.add_callback_threadsafe(fn)

    # Loop thread only:
    def admit(self, consumer: SharedLoopAmqpConsumer) -> bool:
        """True: ``consumer`` may open its connection now; False: it is queued."""
        if self._opening < self._max_opening:
            self._opening += 1
            return True
        self._waiting.append(consumer)
        return False

    def release(self) -> None:
        """A connection finished opening (consuming, failed or closed): let one in."""
        self._opening -= 1
        if self._waiting:
            self.ioloop.call_later(0, self._waiting.popleft().admitted_connect)

    def factory(self, spec: ConsumerSpec) -> NotificationConsumer:
        """A ``consumer_factory`` for ``Client``: AMQP consumers on this loop."""
        return SharedLoopAmqpConsumer(
            self,
            spec.credentials,
            spec.rabbitmq,
            spec.broker_host,
            spec.on_message,
            spec.events,
        )

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop (close the consumers first) and wait for its thread."""
        self._stopped.set()
        self.call(self.ioloop.stop)
        self._thread.join(timeout)


class SharedLoopAmqpConsumer(AmqpConsumer):
    """``AmqpConsumer`` on a shared loop: same behaviour and events, no thread of its own."""

    def __init__(self, loop: SharedAmqpLoop, *args: Any) -> None:
        super().__init__(*args)
        self._shared = loop
        self._done = threading.Event()
        self._started = False
        self._opening = False

    def start(self) -> None:
        with self._lock:
            if self._started or self._stopping.is_set():
                return
            self._started = True
            self._ioloop = self._shared.ioloop
            self._loop_alive = True
        self._shared.call(self._connect)

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping.set()
            started = self._started and self._loop_alive
        if not started:
            return
        self._shared.call(self._shutdown)
        if threading.current_thread() is self._shared._thread:
            return
        if not self._done.wait(timeout):
            _log.warning(
                "AMQP consumer of leaf %s did not stop within %.1f s", self._queue, timeout
            )

    # -- connection opening, at most ``max_opening`` of the loop's at once
    def _connect(self) -> None:
        if self._stopping.is_set() or self._opening:
            super()._connect()
            return
        if self._shared.admit(self):
            self._opening = True
            super()._connect()

    def admitted_connect(self) -> None:
        """Called by the loop when a queued consumer's turn comes."""
        self._opening = True
        super()._connect()

    def _release(self) -> None:
        if self._opening:
            self._opening = False
            self._shared.release()

    def _on_consume_ok(self, frame: Any) -> None:
        self._release()
        super()._on_consume_ok(frame)

    def _attempt_failed(self, error: str) -> None:
        self._release()
        super()._attempt_failed(error)

    def _stop_loop(self) -> None:
        """This consumer is done; the shared loop goes on for the others."""
        self._release()
        if self._done.is_set():
            return
        if self._timer is not None:
            self._shared.ioloop.remove_timeout(self._timer)
            self._timer = None
        with self._lock:
            self._loop_alive = False
        self._connected = False
        self._done.set()
        if self._stopping.is_set() and not self._gave_up:
            self._events.emit("consumer_stopped", transport=TRANSPORT)
