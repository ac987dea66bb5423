"""The HTTP edge of the leaf client: one request with the contract's retry policy.

Why our own loop rather than urllib3's ``Retry``: urllib3 waits 0 s before the first retry,
while the contract documents ``backoff_factor * 2 ** (n - 1)`` before retry n (1 s, 2 s,
4 s for factor 1.0). This loop makes the documented schedule true, honours ``Retry-After``
on 429/503, reports every attempt as an event, and translates every ``requests`` /
``urllib3`` failure into the bk_sim error tree at this edge (PROTOCOL.md sections 2, 5).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import re
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests
import requests.utils
import urllib3

from bk_sim.client._config import Credentials, RetryConfig
from bk_sim.client._events import EventSink
from bk_sim.errors import ApiError, AuthError, ClientError, NotFoundError, TransportError
from bk_sim.redact import redact_url

_log = logging.getLogger("bk_sim.client.http")

JSON_ACCEPT = "application/json"
ANY_ACCEPT = "*/*"
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_PREVIEW_CHARS = 200
# Failures that mean "no usable answer"; requests wraps most urllib3 errors, not all.
_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
# What json.loads raises on bytes that are not JSON; a body nested deeper than the
# interpreter's recursion limit ("[[[[...") raises RecursionError, not ValueError.
JSON_ERRORS = (ValueError, RecursionError)
# Distinct (scheme, host, verify, proxies) settings remembered per environment snapshot.
_SETTINGS_CACHE_SIZE = 32
#: Bytes written at a time when an answer is streamed to a file (downloads).
_STREAM_BLOCK = 2**20


def _environment_snapshot() -> Mapping[Any, Any] | None:
    """What requests reads proxy / CA settings from, comparable in well under a microsecond.

    ``os.environ._data`` is the raw dict behind ``os.environ`` (CPython, all platforms):
    comparing it with a copy is C-speed, while iterating ``os.environ`` decodes every
    name. None (never cache) where it is missing, or where requests also reads proxies
    from the system (macOS, Windows), not only from the environment.
    """
    if getattr(
        requests.utils, "getproxies", None
    ) is not urllib.request.getproxies_environment or getattr(
        requests.utils, "proxy_bypass", None
    ) is not getattr(urllib.request, "proxy_bypass_environment", None):
        return None
    data = getattr(os.environ, "_data", None)
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class HttpResult:
    """A successful answer: status, parsed JSON (None for raw bodies) and raw content."""

    status: int
    body: Any
    content: bytes
    headers: Mapping[str, str]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds asked for by a ``Retry-After`` header (delta seconds or HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


def error_text(content: bytes) -> str:
    """The body's ``error`` text, else a short preview of the body (for error messages)."""
    try:
        body = json.loads(content)
    except JSON_ERRORS:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return error
    preview = content[:_PREVIEW_CHARS].decode("utf-8", errors="replace").strip()
    if len(content) > _PREVIEW_CHARS:
        preview += "..."
    return preview or "(empty body)"


_QUERY_RE = re.compile(r"\?[^\s)'\"]*")


def _describe(exc: BaseException) -> str:
    """A one-line reason for a transport failure, without URL query strings.

    urllib3 puts the request URL in its messages; a pre-signed URL's query is a secret.
    """
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else ""
    text = _QUERY_RE.sub("?...", text)
    return f"{name}: {text}" if text else name


class HttpTransport:
    """Sends the leaf's HTTP requests to one platform host, with retries and events.

    Thread-safe enough for the client's use: the WebSocket consumer may fetch a ticket
    from its own thread while the user uploads. ``sleep`` is the wait between retries;
    it returns early when the transport is closed, and tests may replace it.
    """

    def __init__(
        self,
        host: str,
        credentials: Credentials,
        retry: RetryConfig,
        events: EventSink,
        *,
        verify: bool = True,
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = host.rstrip("/")
        self.retry = retry
        self.verify = verify
        self.proxies: dict[str, str] = dict(proxies or {})
        self._events = events
        self._auth = f"Bearer {credentials.id}:{credentials.session_token}"
        token = credentials.session_token
        # How the token may show in an exception's text: as is, escaped by repr, or cut
        # at a line break.
        self._token_forms = {
            form
            for form in (
                token,
                token.encode("unicode_escape").decode("ascii"),
                *re.split(r"[\r\n]+", token),
            )
            if form
        }
        self._session = requests.Session()
        self._closed = threading.Event()
        self._settings_lock = threading.Lock()
        self._settings_env: dict[Any, Any] | None = None
        self._settings_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._prepared_urls: dict[str, str] = {}
        self.sleep: Callable[[float], None] = self._wait

    # ----------------------------------------------------------------- lifecycle

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop retry waits at once and release pooled connections; idempotent."""
        self._closed.set()
        try:
            self._session.close()
        except Exception:  # noqa: BLE001 - closing must not fail
            _log.debug("closing the HTTP session failed", exc_info=True)

    def _wait(self, seconds: float) -> None:
        self._closed.wait(seconds)

    def url(self, path: str) -> str:
        """The absolute URL of an API path such as ``/api/v1/run/<id>``."""
        return self.base_url + path

    def resolve(self, url: str) -> str:
        """An absolute URL; a relative one (``/blob/x``) is resolved against the host."""
        return urllib.parse.urljoin(self.base_url + "/", url)

    # ----------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        url: str,
        *,
        endpoint: str,
        expect: Iterable[int] = (200,),
        json_body: Any = None,
        data: bytes | IO[bytes] | Iterable[bytes] | None = None,
        headers: Mapping[str, str] | None = None,
        accept: str = JSON_ACCEPT,
        authenticated: bool = True,
        parse_json: bool = True,
        stream_to: Path | None = None,
    ) -> HttpResult:
        """Send one logical request, retrying per ``RetryConfig``; return the answer.

        ``expect`` lists the statuses that mean success. Any other final status raises
        ``ApiError`` (``AuthError`` for 401/403, ``NotFoundError`` for 404) carrying the
        body's ``error`` text; no answer at all raises ``TransportError``. ``data`` may be
        a rewindable file object (rewound before each attempt); with ``stream_to`` an
        expected answer's body is written to that file in 1 MiB blocks, not kept.
        """
        if self._closed.is_set():
            raise ClientError(f"{method} {endpoint}: the client is closed")
        expected = frozenset(expect)
        prepared = self._prepare(method, url, json_body, data, headers, accept, authenticated)
        body = prepared.body
        sent = len(body or b"") if body is not None else 0
        send_kwargs = self._send_settings(prepared.url or url)
        retryable_method = method.upper() in self.retry.allowed_methods
        attempts = 1 + self.retry.max_retries
        shown_url = redact_url(url)
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            response: requests.Response | None = None
            failure: BaseException | None = None
            try:
                if hasattr(body, "seek"):
                    body.seek(0)  # type: ignore[union-attr]
                response, content = self._send(prepared, send_kwargs, expected, stream_to)
            except _TRANSPORT_ERRORS as exc:
                failure = exc
                content = b""
            duration = time.perf_counter() - started
            status = response.status_code if response is not None else None
            received = len(content)
            if stream_to is not None and status in expected:
                with contextlib.suppress(OSError):  # streamed to the file, not kept
                    received = stream_to.stat().st_size
            self._events.emit(
                "http_request",
                transport="http",
                method=method,
                endpoint=endpoint,
                status=status,
                duration_s=duration,
                bytes_sent=sent,
                bytes_received=received,
                attempt=attempt,
                error=_describe(failure) if failure is not None else None,
            )
            if response is not None and status in expected:
                return self._result(method, shown_url, response, content, parse_json)
            retry_left = attempt < attempts and retryable_method and not self._closed.is_set()
            delay = self.retry.backoff(attempt)
            error: ClientError
            if failure is not None:
                error = TransportError(
                    f"{method} {shown_url}: no answer after {attempt} attempt(s): "
                    f"{_describe(failure)}"
                )
                error.__cause__ = failure
                if not retry_left or not self._retryable_failure(failure):
                    raise error
                self._before_retry(method, endpoint, attempt, delay, error=_describe(failure))
            else:
                assert response is not None and status is not None
                error = self._api_error(method, shown_url, status, content, expected)
                if not retry_left or status not in self.retry.status_forcelist:
                    raise error
                if status in _RETRY_AFTER_STATUSES:
                    asked = parse_retry_after(response.headers.get("Retry-After"))
                    if asked is not None:
                        delay = min(asked, self.retry.max_backoff)
                self._before_retry(method, endpoint, attempt, delay, status=status)
            if self._closed.is_set():
                raise error  # closed during the wait: the last answer is the final one
        raise AssertionError("unreachable: the retry loop always returns or raises")

    def _send_settings(self, url: str) -> dict[str, Any]:
        """requests' ``merge_environment_settings`` for ``url``, reused while nothing changed.

        requests re-reads every ``*_proxy`` variable, ``no_proxy`` and
        ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` from ``os.environ`` on every request
        (about 0.2 ms, the largest CPU share of a small upload). Its answer depends only on
        the environment, the URL's scheme and host, ``verify`` and ``proxies``; so it is
        kept per (scheme, host, verify, proxies) and dropped as soon as the environment
        differs from the snapshot it was computed under: setting or removing a proxy or
        CA variable mid-run still takes effect on the next request, as with plain requests.
        """
        env = _environment_snapshot()
        parts = urllib.parse.urlsplit(url)
        key = (parts.scheme, parts.netloc, self.verify, tuple(sorted(self.proxies.items())))
        cached: dict[str, Any] | None = None
        if env is not None:
            with self._settings_lock:
                if env != self._settings_env:
                    self._settings_cache.clear()
                    self._settings_env = dict(env)
                cached = self._settings_cache.get(key)
        if cached is None:
            # A copy: requests adds the environment's proxies to the dict it is given.
            cached = dict(
                self._session.merge_environment_settings(
                    url, dict(self.proxies), None, self.verify, None
                )
            )
            if env is not None:
                with self._settings_lock:
                    if env == self._settings_env:
                        if len(self._settings_cache) >= _SETTINGS_CACHE_SIZE:
                            self._settings_cache.clear()
                        self._settings_cache[key] = cached
        # Copies, so nothing downstream can change the remembered answer.
        return {**cached, "proxies": dict(cached["proxies"])}

    def _send(
        self,
        prepared: requests.PreparedRequest,
        send_kwargs: dict[str, Any],
        expected: frozenset[int] = frozenset(),
        stream_to: Path | None = None,
    ) -> tuple[requests.Response, bytes]:
        if stream_to is not None:
            response = self._session.send(
                prepared,
                timeout=self.retry.total_timeout,
                allow_redirects=True,
                **{**send_kwargs, "stream": True},
            )
            with response:
                if response.status_code not in expected:
                    return response, response.content
                received = 0
                with open(stream_to, "wb") as f:
                    for block in response.iter_content(_STREAM_BLOCK):
                        f.write(block)
                        received += len(block)
            return response, b""
        if send_kwargs.get("verify") is False:
            # The user chose not to verify (ssl=False): urllib3 would warn on every request.
            # catch_warnings is process-global; only unverified clients pay for it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = self._session.send(
                    prepared,
                    timeout=self.retry.total_timeout,
                    allow_redirects=True,
                    **send_kwargs,
                )
                return response, response.content
        response = self._session.send(
            prepared, timeout=self.retry.total_timeout, allow_redirects=True, **send_kwargs
        )
        return response, response.content

    def _prepare(
        self,
        method: str,
        url: str,
        json_body: Any,
        data: bytes | IO[bytes] | Iterable[bytes] | None,
        headers: Mapping[str, str] | None,
        accept: str,
        authenticated: bool,
    ) -> requests.PreparedRequest:
        all_headers = {"accept": accept}
        if authenticated:
            all_headers["Authorization"] = self._auth
            all_headers["LEAF"] = "true"
        all_headers.update(headers or {})
        try:
            # requests.Request(...).prepare() step by step (its documented steps, in its
            # order), with the URL step remembered per URL string: parsing, IDNA and
            # re-quoting the same few API URLs was a third of the preparation's CPU.
            # Not session.prepare_request: it would add .netrc credentials to a URL
            # that must carry none (the pre-signed download URL).
            prepared = requests.PreparedRequest()
            prepared.prepare_method(method)
            prepared.url = self._prepared_url(url)
            prepared.prepare_headers(all_headers)
            prepared.prepare_cookies(None)
            prepared.prepare_body(data, None, json_body)
            prepared.prepare_auth(None, url)
            prepared.prepare_hooks(None)
            return prepared
        except _TRANSPORT_ERRORS as exc:
            reason = _describe(exc)
            if any(form in reason for form in self._token_forms):
                # requests quotes a refused header's value, and ours carries the token.
                raise TransportError(
                    f"{method} {redact_url(url)}: bad request: {type(exc).__name__} "
                    "in the Authorization header"
                ) from None
            raise TransportError(f"{method} {redact_url(url)}: bad request: {reason}") from exc

    def _prepared_url(self, url: str) -> str:
        """``PreparedRequest.prepare_url(url, None)``'s answer, remembered per URL string."""
        known = self._prepared_urls.get(url)
        if known is not None:
            return known
        probe = requests.PreparedRequest()
        probe.prepare_url(url, None)
        prepared = probe.url or url
        if len(self._prepared_urls) >= _SETTINGS_CACHE_SIZE:
            self._prepared_urls.clear()  # pre-signed download URLs are all different
        self._prepared_urls[url] = prepared
        return prepared

    @staticmethod
    def _retryable_failure(exc: BaseException) -> bool:
        """Connection failures and timeouts are retried; TLS and URL errors are not."""
        if isinstance(
            exc,
            (
                requests.exceptions.SSLError,
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
            ),
        ):
            return False
        return True

    def _before_retry(
        self,
        method: str,
        endpoint: str,
        attempt: int,
        delay: float,
        *,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        reason = f"HTTP {status}" if status is not None else error
        _log.warning(
            "%s %s attempt %d failed (%s); retrying in %.2f s",
            method,
            endpoint,
            attempt,
            reason,
            delay,
        )
        self._events.emit(
            "retry_wait",
            transport="http",
            method=method,
            endpoint=endpoint,
            attempt=attempt,
            delay_s=delay,
            status=status,
            error=error,
        )
        self.sleep(delay)

    @staticmethod
    def _api_error(
        method: str, url: str, status: int, content: bytes, expected: frozenset[int]
    ) -> ApiError:
        if 200 <= status < 300:
            message = f"expected HTTP {'/'.join(map(str, sorted(expected)))}; body: " + (
                error_text(content)
            )
        else:
            message = error_text(content)
        cls: type[ApiError] = ApiError
        if status in (401, 403):
            cls = AuthError
        elif status == 404:
            cls = NotFoundError
        return cls(method, url, status, message)

    @staticmethod
    def _result(
        method: str, url: str, response: requests.Response, content: bytes, parse_json: bool
    ) -> HttpResult:
        body: Any = None
        if parse_json:
            try:
                body = json.loads(content) if content else None
            except JSON_ERRORS as exc:
                raise ApiError(
                    method,
                    url,
                    response.status_code,
                    f"response is not JSON: {error_text(content)}",
                ) from exc
        return HttpResult(response.status_code, body, content, dict(response.headers))
