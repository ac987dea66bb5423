"""Run the platform until SIGINT/SIGTERM, announcing its URL once it can serve."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import ssl
import sys
from pathlib import Path

from aiohttp import web

from bk_sim.errors import BkSimError, PlatformError
from bk_sim.files import atomic_write
from bk_sim.npzstream import return_freed_chunks
from bk_sim.platform._app import ACCESS_LOGGER, PLATFORM_KEY, PlatformConfig, build_app
from bk_sim.platform._guard import GuardedSite

log = logging.getLogger(__name__)

#: How long a stop waits for requests in flight (an upload mid-body) before cutting them.
SHUTDOWN_GRACE_S = 5.0
#: Header lines a request may have (aiohttp's default is 128) and the longest header name
#: or value (aiohttp's: 8190): a request head holds at most 8 KiB (request line) + 32 x 2 x
#: 4 KiB = 264 KiB, the bound docs/platform-hardening.md counts per connection.
MAX_HEADERS = 32
MAX_FIELD_SIZE = 4096


def serve(
    config: PlatformConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    ready_file: Path | None = None,
    exit_on_stdin_eof: bool = False,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
) -> None:
    """Serve until a signal; ``ready_file`` gets ``{"url", "pid"}`` once listening.

    ``tls_cert`` / ``tls_key`` (PEM): serve HTTPS and WSS instead of HTTP and WS.

    ``exit_on_stdin_eof``: also stop when stdin closes, so a platform started by a
    harness dies with it (the harness holds the other end of the pipe).
    """
    # pika logs tracebacks for failures this module translates and logs itself.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    return_freed_chunks()  # aggregation streams 4 MiB chunks: give them back (issue 17)
    try:
        context = tls_context(tls_cert, tls_key)
        asyncio.run(_serve(config, host, port, ready_file, exit_on_stdin_eof, context))
    except BkSimError:
        raise
    except OSError as exc:
        raise PlatformError(f"cannot listen on {host}:{port}: {exc}") from exc


def tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """The server-side TLS context of ``--tls-cert`` / ``--tls-key``; None for plain HTTP."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise PlatformError("give both --tls-cert and --tls-key (PEM files), or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise PlatformError(
            f"cannot load the TLS certificate {cert} with key {key}: {reason}"
        ) from exc
    return context


async def _serve(
    config: PlatformConfig,
    host: str,
    port: int,
    ready_file: Path | None,
    exit_on_stdin_eof: bool,
    context: ssl.SSLContext | None = None,
) -> None:
    app = build_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=ACCESS_LOGGER,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=config.limits.keepalive_timeout_s,
        max_headers=MAX_HEADERS,
        max_field_size=MAX_FIELD_SIZE,
    )
    await runner.setup()
    try:
        guard = app[PLATFORM_KEY].guard  # header/body/keep-alive timeouts, connection cap
        # A deep accept queue: a burst of reconnects (thousands of slow connections closed
        # by their timeout) must not overflow it, or a client's SYN is dropped and retried
        # a second later.
        backlog = min(4096, config.limits.max_connections)
        site = GuardedSite(
            runner,
            guard,
            host=host,
            port=port,
            reuse_address=True,
            backlog=backlog,
            ssl_context=context,
        )
        await site.start()
        # What startup created (modules, numpy, the app) lives for ever: out of the
        # collector's full passes, which otherwise stall the loop for tens of ms with
        # thousands of connections open.
        gc.collect()
        gc.freeze()
        bound = runner.addresses[0]
        url = f"{'https' if context is not None else 'http'}://{host}:{bound[1]}"
        log.info("bk-sim platform listening on %s", url)
        if ready_file is not None:
            atomic_write(ready_file, json.dumps({"url": url, "pid": os.getpid()}))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if exit_on_stdin_eof:
            fd = sys.stdin.fileno()

            def _stdin_readable() -> None:
                if not os.read(fd, 4096):
                    log.info("stdin closed: the parent is gone")
                    loop.remove_reader(fd)
                    stop.set()

            loop.add_reader(fd, _stdin_readable)
        await stop.wait()
        log.info("bk-sim platform stopping")
    finally:
        await runner.cleanup()
