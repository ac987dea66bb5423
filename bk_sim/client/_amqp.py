"""The AMQP notification consumer of the leaf client (PROTOCOL.md 4 and 4a).

Why pika's ``SelectConnection`` on a private ``IOLoop`` in one daemon thread, and not a
``BlockingConnection``: the blocking adapter cannot be interrupted from another thread
while it is inside its constructor (a TCP connect or TLS handshake to a black-holed host
waits for the full socket/stack timeout), so ``close()`` would be as slow as the slowest
connect. With the asynchronous adapter every state (connecting, opening the channel,
consuming, waiting out a backoff timer) lives on one loop that ``close()`` reaches at once
through ``IOLoop.add_callback_threadsafe``; a connection that is still opening is aborted
on the spot, a backoff timer is simply removed. The same loop sends and checks heartbeats,
so a missed heartbeat, a lost TCP stream, a broker-forced close (320), a channel closed by
the broker (404 queue gone, 403) and a consumer cancelled by the broker (queue deleted)
all reach the same place, ``_on_connection_closed``, and take the same backoff path.

Rules kept here:

* vhost = ``tree_id``, user = leaf id, password = ``session_token``, heartbeat from the
  config, connection name ``leaf-<leaf_id>``, TLS (verified) when ``config.ssl``.
* The queue (named after the leaf) is never declared: the platform owns the topology and
  the leaf user has read permission on its queue only. ``basic_consume`` on a missing
  queue fails with a channel-level 404, which is retried like any other failure, because
  the platform may re-declare it.
* prefetch 1, manual ack after ``on_message`` returns. A handler exception is logged and
  the message is still acked (a poison message must not loop forever); a body that is not
  a JSON object is logged, acked and dropped.
* The wait before reconnect attempt ``n`` is ``reconnect_delay(n, factor, max_delay)``;
  attempt 0 is the first connect and has no wait; the counter resets to 0 once consuming;
  after ``max_reconnect_attempts`` failed reconnects (0 = never) ``give_up`` is emitted
  and the thread ends. Auth failures are retried too (a rotated token may be provisioned
  late), but their event text says the credentials were refused.

``on_message`` runs on the consumer thread; while it runs no heartbeat is processed, so it
must return well within the heartbeat interval.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.channel
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.select_connection import IOLoop, SelectConnection
from pika.adapters.utils import connection_workflow as cw

from bk_sim.client._backoff import attempts_left, reconnect_delay
from bk_sim.client._config import Credentials, RabbitMQConfig
from bk_sim.client._events import EventSink
from bk_sim.client._http import JSON_ERRORS

_log = logging.getLogger("bk_sim.client.amqp")

TRANSPORT = "amqp"
PREFETCH = 1
#: TCP connect / TLS handshake bound of one attempt (pika ``socket_timeout``).
SOCKET_TIMEOUT_S = 5.0
#: Whole-attempt bound: TCP + TLS + AMQP handshake (pika ``stack_timeout``).
STACK_TIMEOUT_S = 10.0
#: A connection the broker keeps blocked (resource alarm) this long is dropped and redone.
BLOCKED_CONNECTION_TIMEOUT_S = 60.0
#: How long the loop waits for the AMQP close handshake on ``close()`` before it stops anyway.
CLOSE_GRACE_S = 2.0


#: pika's messages when a connection died while it was being opened (see ``_run``).
_PIKA_OPEN_ABORTED = (
    "Expected connected socket, but getpeername() failed",
    "from workflow, but got",
)


def describe_amqp_error(exc: BaseException | None, queue: str = "") -> str:
    """A short, secret-free text for an event's ``error`` field."""
    if exc is None:
        return "unknown error"
    exc = _innermost(exc)
    if isinstance(exc, (OSError, cw.AMQPConnectorStackTimeout)):
        return f"cannot connect: {type(exc).__name__}: {_first_line(exc)}"
    if isinstance(
        exc, (pika.exceptions.ProbableAuthenticationError, pika.exceptions.AuthenticationError)
    ):
        return f"credentials refused by the broker: {_first_line(exc)}"
    if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
        return f"access to the vhost refused by the broker: {_first_line(exc)}"
    if isinstance(exc, pika.exceptions.ConnectionClosedByBroker):
        if exc.reply_code == 403:
            return f"credentials refused by the broker (403 {exc.reply_text})"
        if exc.reply_code == 530:
            return f"access to the vhost refused by the broker (530 {exc.reply_text})"
        return f"connection closed by the broker ({exc.reply_code} {exc.reply_text})"
    if isinstance(exc, pika.exceptions.ChannelClosedByBroker):
        if exc.reply_code == 404:
            return f"queue {queue!r} not found, channel closed by the broker (404 {exc.reply_text})"
        if exc.reply_code == 403:
            return f"access to queue {queue!r} refused (403 {exc.reply_text})"
        return f"channel closed by the broker ({exc.reply_code} {exc.reply_text})"
    if isinstance(exc, pika.exceptions.AMQPHeartbeatTimeout):
        return f"missed heartbeats: {_first_line(exc)}"
    if isinstance(exc, pika.exceptions.StreamLostError):
        return f"connection lost: {_first_line(exc)}"
    if isinstance(exc, pika.exceptions.ConnectionBlockedTimeout):
        return "connection blocked by the broker for too long"
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _innermost(exc: BaseException) -> BaseException:
    """Unwrap pika's connection-workflow wrappers down to the error that caused them."""
    for _ in range(8):
        if isinstance(exc, cw.AMQPConnectionWorkflowFailed) and exc.exceptions:
            exc = exc.exceptions[-1]
        elif isinstance(exc, cw.AMQPConnectorPhaseErrorBase):
            exc = exc.exception
        elif (
            type(exc) is pika.exceptions.AMQPConnectionError
            and exc.args
            and isinstance(exc.args[0], BaseException)
        ):
            exc = exc.args[0]
        else:
            break
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or repr(exc)
    return text.splitlines()[0][:300]


class AmqpConsumer:
    """Consumes the leaf's queue and hands each JSON notification to ``on_message``.

    ``start()`` returns at once; connecting, consuming and reconnecting happen on a
    daemon thread. ``close()`` is prompt and idempotent from any thread, including from
    inside ``on_message``.
    """

    def __init__(
        self,
        credentials: Credentials,
        config: RabbitMQConfig,
        host: str,
        on_message: Callable[[dict[str, Any]], None],
        events: EventSink,
    ) -> None:
        self._credentials = credentials
        self._config = config
        self._host = host
        self._queue = credentials.id
        self._on_message = on_message
        self._events = events
        self._params = self._parameters()

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._ioloop: IOLoop | None = None
        self._loop_alive = False

        # Loop-thread state (only touched on the consumer thread).
        self._connection: SelectConnection | None = None
        self._channel: pika.channel.Channel | None = None
        self._timer: Any = None  # pika's timeout handle of the pending reconnect
        self._attempt = 0
        self._attempt_started = 0.0
        self._consuming_since: float | None = None
        self._channel_error: str | None = None
        self._last_error: str | None = None
        self._connected = False
        self._gave_up = False

    # -- public surface
    @property
    def connected(self) -> bool:
        """True while the consumer holds an open channel with an active consumer."""
        return self._connected

    def start(self) -> None:
        """Start the consumer thread; a second call, or a call after ``close()``, does nothing."""
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._ioloop = IOLoop()
            self._loop_alive = True
            self._thread = threading.Thread(
                target=self._run, name=f"bk-amqp-{self._queue[:8]}", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop consuming and close the connection; waits at most ``timeout`` seconds."""
        with self._lock:
            self._stopping.set()
            thread = self._thread
            if self._loop_alive and self._ioloop is not None:
                self._ioloop.add_callback_threadsafe(self._shutdown)
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            _log.warning(
                "AMQP consumer of leaf %s did not stop within %.1f s", self._queue, timeout
            )

    # -- connection parameters
    def _parameters(self) -> pika.ConnectionParameters:
        creds = self._credentials
        ssl_options = None
        if self._config.ssl:
            ssl_options = pika.SSLOptions(ssl.create_default_context(), server_hostname=self._host)
        return pika.ConnectionParameters(
            host=self._host,
            port=self._config.port,
            virtual_host=creds.tree_id,
            credentials=pika.PlainCredentials(creds.id, creds.session_token),
            heartbeat=self._config.heartbeat,
            ssl_options=ssl_options,
            connection_attempts=1,
            retry_delay=0,
            socket_timeout=SOCKET_TIMEOUT_S,
            stack_timeout=STACK_TIMEOUT_S,
            blocked_connection_timeout=BLOCKED_CONNECTION_TIMEOUT_S,
            client_properties={"connection_name": f"leaf-{creds.id}"},
        )

    # -- the consumer thread
    def _run(self) -> None:
        ioloop = self._ioloop
        assert ioloop is not None
        try:
            if not self._stopping.is_set():
                ioloop.add_callback_threadsafe(self._connect)
                while True:
                    try:
                        ioloop.start()
                        break
                    except (ValueError, AssertionError) as exc:
                        # pika raises these out of the loop, not to on_open_error, when the
                        # peer reset the socket between connect and the stream set-up (a
                        # proxy or load balancer in front of a broker that is down), or when
                        # the connection was closed during its AMQP handshake (pika 1.4's
                        # workflow passes the exception class): one failed attempt, and the
                        # loop can run again. Unless a reconnect is already scheduled.
                        if self._stopping.is_set() or not any(
                            m in str(exc) for m in _PIKA_OPEN_ABORTED
                        ):
                            raise
                        self._connection = None
                        if self._timer is None:
                            self._attempt_failed(describe_amqp_error(exc, self._queue))
        except Exception as exc:  # noqa: BLE001 - a bug must end the thread loudly, not hang
            if isinstance(exc, AssertionError) and self._stopping.is_set():
                # pika 1.4 raises AssertionError out of the loop when a connection is
                # closed during its AMQP handshake (its workflow passes the exception
                # class, not an instance); it has closed the socket by then, so the stop
                # is complete.
                _log.debug("pika asserted while aborting an opening connection", exc_info=True)
            else:
                _log.exception("AMQP consumer of leaf %s crashed", self._queue)
                self._connected = False
                self._gave_up = True
                self._events.emit(
                    "give_up",
                    transport=TRANSPORT,
                    attempt=self._attempt,
                    error=f"consumer crashed: {exc}",
                )
        finally:
            with self._lock:
                self._loop_alive = False
            self._connected = False
            conn = self._connection
            if conn is not None and not conn.is_closed:
                _log.warning(
                    "AMQP connection of leaf %s left without a close handshake", self._queue
                )
            ioloop.close()
            if self._stopping.is_set() and not self._gave_up:
                self._events.emit("consumer_stopped", transport=TRANSPORT)

    def _connect(self) -> None:
        self._timer = None
        if self._stopping.is_set():
            self._stop_loop()
            return
        self._attempt_started = time.monotonic()
        self._channel_error = None
        self._consuming_since = None
        _log.debug("AMQP connect attempt %d to %s:%d", self._attempt, self._host, self._config.port)
        try:
            self._connection = SelectConnection(
                parameters=self._params,
                on_open_callback=self._on_connection_open,
                on_open_error_callback=self._on_connection_open_error,
                on_close_callback=self._on_connection_closed,
                custom_ioloop=self._ioloop,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to even start is one failed attempt
            self._connection = None
            self._attempt_failed(describe_amqp_error(exc, self._queue))

    def _on_connection_open(self, connection: SelectConnection) -> None:
        if self._stopping.is_set():
            connection.close()
            return
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(
        self, _connection: SelectConnection, error: BaseException
    ) -> None:
        self._connection = None
        self._channel = None
        if self._stopping.is_set():
            self._stop_loop()
            return
        self._attempt_failed(describe_amqp_error(error, self._queue))

    def _on_channel_open(self, channel: pika.channel.Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.basic_qos(prefetch_count=PREFETCH, callback=self._on_qos_ok)

    def _on_qos_ok(self, _frame: pika.frame.Method) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        channel.basic_consume(
            queue=self._queue,
            on_message_callback=self._on_delivery,
            auto_ack=False,
            callback=self._on_consume_ok,
        )

    def _on_consume_ok(self, _frame: pika.frame.Method) -> None:
        now = time.monotonic()
        self._consuming_since = now
        self._connected = True
        _log.info("AMQP consumer of leaf %s consuming (attempt %d)", self._queue, self._attempt)
        self._events.emit(
            "connect",
            transport=TRANSPORT,
            attempt=self._attempt,
            duration_s=now - self._attempt_started,
        )
        self._attempt = 0

    def _on_delivery(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        _properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        if self._stopping.is_set():
            return  # not acked: the broker requeues it when the connection closes
        try:
            message = json.loads(body)
        except JSON_ERRORS:
            _log.warning("dropping a notification that is not JSON: %r", body[:200])
            message = None
        if message is not None and not isinstance(message, dict):
            _log.warning("dropping a notification that is not a JSON object: %r", body[:200])
            message = None
        if message is not None:
            try:
                self._on_message(message)
            except Exception:  # noqa: BLE001 - a handler bug must not kill the consumer
                _log.exception("notification handler failed; the message is acked anyway")
        if channel.is_open:
            channel.basic_ack(delivery_tag=method.delivery_tag)

    def _on_consumer_cancelled(self, _frame: pika.frame.Method) -> None:
        self._channel_error = f"consumer cancelled by the broker (queue {self._queue!r} deleted?)"
        self._close_connection()

    def _on_channel_closed(self, _channel: pika.channel.Channel, reason: Exception) -> None:
        self._channel = None
        self._connected = False
        if self._stopping.is_set():
            return
        if self._channel_error is None:
            self._channel_error = describe_amqp_error(reason, self._queue)
        self._close_connection()

    def _close_connection(self) -> None:
        conn = self._connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    def _on_connection_closed(self, _connection: SelectConnection, reason: Exception) -> None:
        self._connection = None
        self._channel = None
        self._connected = False
        if self._stopping.is_set():
            self._stop_loop()
            return
        error = self._channel_error or describe_amqp_error(reason, self._queue)
        if self._consuming_since is None:
            self._attempt_failed(error)
            return
        up = time.monotonic() - self._consuming_since
        self._consuming_since = None
        _log.warning("AMQP consumer of leaf %s disconnected: %s", self._queue, error)
        self._events.emit("disconnect", transport=TRANSPORT, error=error, duration_s=up)
        self._last_error = error
        self._attempt = 1
        self._schedule_reconnect()

    def _attempt_failed(self, error: str) -> None:
        _log.warning(
            "AMQP connect attempt %d of leaf %s failed: %s", self._attempt, self._queue, error
        )
        self._events.emit(
            "connect_failed",
            transport=TRANSPORT,
            attempt=self._attempt,
            error=error,
            duration_s=time.monotonic() - self._attempt_started,
        )
        self._last_error = error
        self._attempt += 1
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        cfg = self._config
        if not attempts_left(self._attempt, cfg.max_reconnect_attempts):
            failed = self._attempt - 1
            _log.error(
                "AMQP consumer of leaf %s gives up after %d reconnect attempts: %s",
                self._queue,
                failed,
                self._last_error,
            )
            self._gave_up = True
            self._events.emit(
                "give_up", transport=TRANSPORT, attempt=failed, error=self._last_error
            )
            self._stop_loop()
            return
        delay = reconnect_delay(
            self._attempt, cfg.reconnect_backoff_factor, cfg.reconnect_max_delay
        )
        self._events.emit(
            "reconnect_wait", transport=TRANSPORT, attempt=self._attempt, delay_s=delay
        )
        assert self._ioloop is not None
        self._timer = self._ioloop.call_later(delay, self._connect)

    def _shutdown(self) -> None:
        """Runs on the loop after ``close()``: cancel any wait, close the connection, stop."""
        assert self._ioloop is not None
        if self._timer is not None:
            self._ioloop.remove_timeout(self._timer)
            self._timer = None
        self._connected = False
        conn = self._connection
        if conn is None or conn.is_closed:
            self._stop_loop()
            return
        if not conn.is_closing:
            # Open: clean AMQP close. Opening: pika aborts the TCP connect, TLS or AMQP
            # handshake. Either way a close callback then stops the loop.
            conn.close()
        self._ioloop.call_later(CLOSE_GRACE_S, self._stop_loop)

    def _stop_loop(self) -> None:
        assert self._ioloop is not None
        self._ioloop.stop()
