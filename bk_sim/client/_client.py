"""``Client``: the faithful BranchKey leaf client (PROTOCOL.md sections 2-6).

It owns one HTTP transport (``_http``), one notification consumer (from
``consumer_factory``: AMQP by default, WebSocket when asked, none with
``notifications=False``), the one-slot aggregation queue, and the run state the platform
tells it about. Its positional signature and return types are the published client's
(branchkey 2.9.0 and 3.0.1); see docs/client.md for the deliberate differences. It knows
nothing of scenarios, processes or reports: everything it does is reported through the
observer's events.
"""

from __future__ import annotations

import json
import logging
import os
import queue as _queue
import threading
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import urllib3

from bk_sim import analytics as _analytics
from bk_sim import weights as _weights
from bk_sim.client._config import (
    DEFAULT_HOST,
    DEFAULT_OUTPUT_DIR,
    APIConfig,
    Credentials,
    RabbitMQConfig,
    RetryConfig,
    RunConfig,
    WebSocketConfig,
)
from bk_sim.client._consumer import (
    ConsumerFactory,
    ConsumerSpec,
    NotificationConsumer,
    default_consumer,
)
from bk_sim.client._events import EventSink, Observer
from bk_sim.client._http import ANY_ACCEPT, HttpResult, HttpTransport
from bk_sim.client._latest import LatestQueue
from bk_sim.client._metadata import metadata_dict
from bk_sim.client._stream import (
    STREAM_THRESHOLD,
    MultipartFileBody,
    check_weights_file,
    multipart_file_body,
)
from bk_sim.errors import (
    ApiError,
    BkSimError,
    ClientConfigError,
    ClientError,
    RunBlockedError,
    UnsafeFileIdError,
    WeightsFormatError,
)
from bk_sim.npzstream import file_digest
from bk_sim.redact import redact_url

_log = logging.getLogger("bk_sim.client")

RUN_STATUSES = ("start", "stop", "pause")
METRIC_MODES = ("test", "train", "non-federated")
_PROXY_SCHEMES = ("http", "https", "socks4", "socks4a", "socks5", "socks5h")
_CONSUMER_CLOSE_TIMEOUT = 5.0
# Upload contents (by SHA-256 digest and size) that passed the client-side check.
_VALIDATED_MEMORY = 32


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything the client was configured with, after the flat kwargs were merged."""

    credentials: Credentials
    api: APIConfig
    rabbitmq: RabbitMQConfig
    websocket: WebSocketConfig
    run: RunConfig
    retry: RetryConfig
    use_websocket: bool
    notifications: bool
    output_dir: Path

    @property
    def broker_host(self) -> str:
        """``rbmq_host``, else the API host's hostname (PROTOCOL.md 4a)."""
        return self.rabbitmq.host or (urllib.parse.urlsplit(self.api.host).hostname or "")

    @property
    def websocket_url(self) -> str:
        return websocket_url(self.api.host)


def websocket_url(host: str) -> str:
    """``ws(s)://<api host>/api/v1/ws`` for an ``http(s)://`` API host (PROTOCOL.md 4b)."""
    parts = urllib.parse.urlsplit(host)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ClientConfigError(f"host must start with http:// or https://, got {host!r}")
    path = parts.path.rstrip("/") + "/api/v1/ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def resolve_settings(
    credentials: Credentials | Mapping[str, Any],
    *,
    host: str = DEFAULT_HOST,
    rbmq_host: str | None = None,
    rbmq_port: int = 5671,
    rbmq_ssl: bool = True,
    rbmq_max_reconnect_attempts: int = 10,
    rbmq_reconnect_backoff_factor: float = 2.0,
    rbmq_reconnect_max_delay: float = 60,
    ssl: bool = True,
    wait_for_run: bool = False,
    run_check_interval_s: float = 30,
    proxies: Mapping[str, str] | None = None,
    retry_config: RetryConfig | Mapping[str, Any] | None = None,
    api_config: APIConfig | None = None,
    rabbitmq_config: RabbitMQConfig | None = None,
    websocket_config: WebSocketConfig | None = None,
    run_config: RunConfig | None = None,
    use_websocket: bool = False,
    notifications: bool = True,
    output_dir: str | os.PathLike[str] | None = None,
) -> Settings:
    """Merge the flat kwargs and the config objects (objects win) and check them all.

    Raises ``ClientConfigError`` naming the first bad setting; makes no request.
    """
    if isinstance(credentials, Credentials):
        creds = credentials
    elif isinstance(credentials, Mapping):
        creds = Credentials.from_dict(credentials)
    else:
        raise ClientConfigError(
            f"credentials must be a dict or Credentials, got {type(credentials).__name__}"
        )
    api = api_config if api_config is not None else APIConfig(host=host, ssl=ssl, proxies=proxies)
    rabbit = (
        rabbitmq_config
        if rabbitmq_config is not None
        else RabbitMQConfig(
            host=rbmq_host,
            port=rbmq_port,
            ssl=rbmq_ssl,
            max_reconnect_attempts=rbmq_max_reconnect_attempts,
            reconnect_backoff_factor=rbmq_reconnect_backoff_factor,
            reconnect_max_delay=rbmq_reconnect_max_delay,
        )
    )
    run = (
        run_config
        if run_config is not None
        else RunConfig(wait_for_run=wait_for_run, check_interval_s=run_check_interval_s)
    )
    ws = websocket_config if websocket_config is not None else WebSocketConfig()
    if retry_config is None:
        retry = RetryConfig()
    elif isinstance(retry_config, RetryConfig):
        retry = retry_config
    elif isinstance(retry_config, Mapping):
        try:
            retry = RetryConfig(**retry_config)
        except TypeError as exc:
            raise ClientConfigError(f"retry_config: {exc}") from exc
    else:
        raise ClientConfigError(
            f"retry_config must be a RetryConfig, got {type(retry_config).__name__}"
        )
    for name, obj, cls in (
        ("api_config", api, APIConfig),
        ("rabbitmq_config", rabbit, RabbitMQConfig),
        ("websocket_config", ws, WebSocketConfig),
        ("run_config", run, RunConfig),
    ):
        if not isinstance(obj, cls):
            hint = (
                " (the seed README's host is keyword-only: pass host=...)"
                if name == "api_config" and isinstance(obj, str)
                else ""
            )
            raise ClientConfigError(
                f"{name} must be a {cls.__name__}, got {type(obj).__name__}{hint}"
            )
    _check_api(api)
    _check_rabbitmq(rabbit)
    _check_websocket(ws)
    _check_run(run)
    _check_retry(retry)
    if output_dir is None:
        output_dir = DEFAULT_OUTPUT_DIR
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ClientConfigError(f"output_dir must be a path, got {output_dir!r}")
    return Settings(
        credentials=creds,
        api=api,
        rabbitmq=rabbit,
        websocket=ws,
        run=run,
        retry=retry,
        use_websocket=bool(use_websocket),
        notifications=bool(notifications),
        output_dir=Path(output_dir),
    )


def _split_url(url: str, what: str) -> urllib.parse.SplitResult:
    """``urlsplit``, whose ValueError (``http://[::1``: bad IPv6 brackets) is a config error."""
    try:
        return urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise ClientConfigError(f"{what} is not a valid URL ({exc})") from None


def _check_api(api: APIConfig) -> None:
    if not isinstance(api.host, str):
        raise ClientConfigError(f"host must be a URL string, got {api.host!r}")
    parts = _split_url(api.host, f"host {api.host!r}")
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ClientConfigError(f"host must look like https://name[:port], got {api.host!r}")
    if parts.query or parts.fragment:
        raise ClientConfigError(f"host must not carry a query or fragment, got {api.host!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ClientConfigError(f"host has a bad port: {api.host!r}") from exc
    if not isinstance(api.ssl, bool):
        raise ClientConfigError(f"ssl must be True or False, got {api.ssl!r}")
    if api.proxies is None:
        return
    if not isinstance(api.proxies, Mapping):
        raise ClientConfigError(
            f"proxies must be a dict like {{'https': 'socks5://host:1080'}}, got {api.proxies!r}"
        )
    for key, url in api.proxies.items():
        if not isinstance(key, str) or not isinstance(url, str):
            raise ClientConfigError(f"proxies[{key!r}] must be a URL string, got {url!r}")
        proxy = _split_url(url, f"proxies[{key!r}]")  # never shown: it may hold a password
        scheme = proxy.scheme.lower()
        if scheme not in _PROXY_SCHEMES or not proxy.hostname:
            raise ClientConfigError(
                f"proxies[{key!r}] must be a {'/'.join(_PROXY_SCHEMES)} URL with a host, "
                f"got {redact_url(url)!r}"
            )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_reconnect(prefix: str, attempts: Any, factor: Any, max_delay: Any) -> None:
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        raise ClientConfigError(
            f"{prefix}max_reconnect_attempts must be an int >= 0 (0 = forever), got {attempts!r}"
        )
    if not _is_number(factor) or factor <= 0:
        raise ClientConfigError(f"{prefix}reconnect_backoff_factor must be > 0, got {factor!r}")
    if not _is_number(max_delay) or max_delay < 0:
        raise ClientConfigError(f"{prefix}reconnect_max_delay must be >= 0, got {max_delay!r}")


def _check_rabbitmq(cfg: RabbitMQConfig) -> None:
    if cfg.host is not None and (not isinstance(cfg.host, str) or not cfg.host):
        raise ClientConfigError(f"rbmq_host must be a host name or None, got {cfg.host!r}")
    if not isinstance(cfg.port, int) or isinstance(cfg.port, bool) or not 0 < cfg.port < 65536:
        raise ClientConfigError(f"rbmq_port must be 1-65535, got {cfg.port!r}")
    if not isinstance(cfg.ssl, bool):
        raise ClientConfigError(f"rbmq_ssl must be True or False, got {cfg.ssl!r}")
    if not isinstance(cfg.heartbeat, int) or isinstance(cfg.heartbeat, bool) or cfg.heartbeat < 0:
        raise ClientConfigError(f"rabbitmq_config.heartbeat must be >= 0, got {cfg.heartbeat!r}")
    _check_reconnect(
        "rbmq_", cfg.max_reconnect_attempts, cfg.reconnect_backoff_factor, cfg.reconnect_max_delay
    )


def _check_websocket(cfg: WebSocketConfig) -> None:
    _check_reconnect(
        "websocket_config.",
        cfg.max_reconnect_attempts,
        cfg.reconnect_backoff_factor,
        cfg.reconnect_max_delay,
    )
    if not _is_number(cfg.open_timeout) or cfg.open_timeout <= 0:
        raise ClientConfigError(
            f"websocket_config.open_timeout must be > 0, got {cfg.open_timeout!r}"
        )


def _check_run(cfg: RunConfig) -> None:
    if not isinstance(cfg.wait_for_run, bool):
        raise ClientConfigError(f"wait_for_run must be True or False, got {cfg.wait_for_run!r}")
    if not _is_number(cfg.check_interval_s) or cfg.check_interval_s <= 0:
        raise ClientConfigError(f"run_check_interval_s must be > 0, got {cfg.check_interval_s!r}")


def _check_retry(cfg: RetryConfig) -> None:
    if not isinstance(cfg.max_retries, int) or isinstance(cfg.max_retries, bool):
        raise ClientConfigError(f"retry_config.max_retries must be an int, got {cfg.max_retries!r}")
    bad = [s for s in cfg.status_forcelist if not isinstance(s, int) or not 100 <= s <= 599]
    if bad:
        raise ClientConfigError(f"retry_config.status_forcelist holds non-statuses: {bad!r}")
    if isinstance(cfg.allowed_methods, str) or not all(
        isinstance(m, str) and m == m.upper() for m in cfg.allowed_methods
    ):
        raise ClientConfigError(
            "retry_config.allowed_methods must be a tuple of upper-case methods, "
            f"got {cfg.allowed_methods!r}"
        )


# --------------------------------------------------------------------------- pure helpers


def safe_download_path(output_dir: Path, file_id: Any) -> Path:
    """``<output_dir>/<file_id>.npz``, or ``UnsafeFileIdError`` if the id would leave it."""
    if not isinstance(file_id, str) or not file_id:
        raise UnsafeFileIdError(f"file id must be a non-empty string, got {file_id!r}")
    if (
        file_id in (".", "..")
        or file_id.startswith(".")
        or any(c in file_id for c in ("/", "\\", "\x00", ":"))
        or os.path.isabs(file_id)
        or any(ord(c) < 32 for c in file_id)
    ):
        raise UnsafeFileIdError(f"file id {file_id!r} would leave the output folder {output_dir}")
    target = output_dir / f"{file_id}.npz"
    base = output_dir.resolve()
    if target.resolve().parent != base:
        raise UnsafeFileIdError(f"file id {file_id!r} would leave the output folder {output_dir}")
    return target


@dataclass(frozen=True)
class Notification:
    """A decoded notification message (PROTOCOL.md section 4)."""

    message_type: str
    value: str


def parse_notification(msg: Any) -> Notification:
    """Check a notification message's shape; ``ValueError`` says what is wrong."""
    if not isinstance(msg, Mapping):
        raise ValueError(f"message must be a JSON object, got {type(msg).__name__}")
    kind = msg.get("message_type")
    body = msg.get("body")
    if not isinstance(body, Mapping):
        raise ValueError(f"message body must be an object, got {body!r}")
    if kind == "aggregation_status":
        agg = body.get("aggregation_id")
        if not isinstance(agg, str) or not agg:
            raise ValueError(f"aggregation_id must be a non-empty string, got {agg!r}")
        return Notification(kind, agg)
    if kind == "run_status":
        status = body.get("run_status")
        if status not in RUN_STATUSES:
            raise ValueError(f"run_status must be one of {RUN_STATUSES}, got {status!r}")
        return Notification(kind, status)
    raise ValueError(f"unknown message_type {kind!r}")


def _to_numpy(tensor: Any) -> np.ndarray:
    """A numpy snapshot of a tensor-like: torch (``detach().cpu().numpy()``) or array."""
    if hasattr(tensor, "detach"):
        arr = tensor.detach().cpu().numpy()
    elif hasattr(tensor, "numpy") and not isinstance(tensor, np.ndarray):
        arr = tensor.numpy()
    else:
        arr = tensor
    # A copy: .numpy() shares memory with the tensor, and training goes on mutating it.
    return np.array(arr, copy=True)


# --------------------------------------------------------------------------- the client


class Client:
    """A BranchKey leaf: uploads weights or analytics, receives aggregates, follows the run.

    Positional parameters are the published client's (``credentials, api_config,
    rabbitmq_config, websocket_config, run_config, retry_config, use_websocket,
    output_dir``); the seed README's flat settings (``host=``, ``rbmq_*=``, ``ssl=``,
    ``proxies=``, ...) are keyword-only, and a config object wins over them.
    ``consumer_factory`` builds the notification consumer (default: AMQP, or WebSocket
    with ``use_websocket``).

    Construction checks every setting (``ClientConfigError`` before any request), reads
    the run details once (a failure there fails construction), then starts the
    notification consumer in its own thread; it never waits on the broker.
    """

    def __init__(
        self,
        credentials: Credentials | Mapping[str, Any],
        api_config: APIConfig | None = None,
        rabbitmq_config: RabbitMQConfig | None = None,
        websocket_config: WebSocketConfig | None = None,
        run_config: RunConfig | None = None,
        retry_config: RetryConfig | Mapping[str, Any] | None = None,
        use_websocket: bool = False,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = DEFAULT_HOST,
        rbmq_host: str | None = None,
        rbmq_port: int = 5671,
        rbmq_ssl: bool = True,
        rbmq_max_reconnect_attempts: int = 10,
        rbmq_reconnect_backoff_factor: float = 2.0,
        rbmq_reconnect_max_delay: float = 60,
        ssl: bool = True,
        wait_for_run: bool = False,
        run_check_interval_s: float = 30,
        proxies: Mapping[str, str] | None = None,
        notifications: bool = True,
        observer: Observer | None = None,
        consumer_factory: ConsumerFactory | None = None,
    ) -> None:
        self._initialized = False
        self._closed = threading.Event()
        self._consumer: NotificationConsumer | None = None
        if observer is not None and not callable(getattr(observer, "on_event", None)):
            raise ClientConfigError("observer must have an on_event(event) method")
        if consumer_factory is not None and not callable(consumer_factory):
            raise ClientConfigError(
                f"consumer_factory must be callable, got {type(consumer_factory).__name__}"
            )
        self._consumer_factory: ConsumerFactory = consumer_factory or default_consumer
        self._settings = resolve_settings(
            credentials,
            host=host,
            rbmq_host=rbmq_host,
            rbmq_port=rbmq_port,
            rbmq_ssl=rbmq_ssl,
            rbmq_max_reconnect_attempts=rbmq_max_reconnect_attempts,
            rbmq_reconnect_backoff_factor=rbmq_reconnect_backoff_factor,
            rbmq_reconnect_max_delay=rbmq_reconnect_max_delay,
            ssl=ssl,
            wait_for_run=wait_for_run,
            run_check_interval_s=run_check_interval_s,
            proxies=proxies,
            retry_config=retry_config,
            api_config=api_config,
            rabbitmq_config=rabbitmq_config,
            websocket_config=websocket_config,
            run_config=run_config,
            use_websocket=use_websocket,
            notifications=notifications,
            output_dir=output_dir,
        )
        creds = self._settings.credentials
        self._credentials = creds
        self._events = EventSink(observer, creds.id)
        self._queue = LatestQueue()
        self._state_lock = threading.Lock()
        self._run_changed = threading.Event()
        self._run_status: str | None = None
        self._run_number: int | None = None
        self._status_seq = 0  # counts run_status notifications (see get_run_details)
        self._refresh_lock = threading.Lock()
        self._refreshed = threading.Event()  # set after each post-start refresh (tests)
        self._validated: dict[tuple[str, int], str] = {}  # see _check_upload
        self._http = HttpTransport(
            self._settings.api.host,
            creds,
            self._settings.retry,
            self._events,
            verify=self._settings.api.ssl,
            proxies=self._settings.api.proxies,
        )
        try:
            self.get_run_details()
            if self._settings.notifications:
                self._consumer = self._make_consumer()
                self._consumer.start()
        except BaseException:
            self.close()
            raise
        self._initialized = True

    # ----------------------------------------------------------------- properties

    @property
    def queue(self) -> LatestQueue:
        """The newest unread aggregation id (a newer one replaces an unread older one)."""
        return self._queue

    @property
    def run_status(self) -> str | None:
        return self._run_status

    @property
    def run_number(self) -> int | None:
        return self._run_number

    @property
    def leaf_id(self) -> str:
        return self._credentials.id

    @property
    def leaf_name(self) -> str:
        return self._credentials.name

    @property
    def branch_id(self) -> str:
        return self._credentials.branch_id

    @property
    def tree_id(self) -> str:
        return self._credentials.tree_id

    @property
    def user_id(self) -> str:
        return self._credentials.owner_id

    @property
    def session_token(self) -> str:
        return self._credentials.session_token

    @property
    def credentials(self) -> Credentials:
        return self._credentials

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def use_websocket(self) -> bool:
        """Whether notifications come over the WebSocket (else AMQP)."""
        return self._settings.use_websocket

    @property
    def output_dir(self) -> str:
        """Where ``file_download`` writes aggregates (default ``./aggregated_output``)."""
        return str(self._settings.output_dir)

    @property
    def is_initialized(self) -> bool:
        """True once construction succeeded, until ``close``."""
        return self._initialized and not self._closed.is_set()

    @property
    def notifications_connected(self) -> bool:
        """Whether the notification consumer is connected right now."""
        return self._consumer is not None and bool(self._consumer.connected)

    def __repr__(self) -> str:
        return (
            f"Client(leaf_id={self.leaf_id!r}, host={self._settings.api.host!r}, "
            f"run_status={self._run_status!r})"
        )

    # ----------------------------------------------------------------- weights helpers

    @staticmethod
    def save_weights(
        file_path: str | os.PathLike[str],
        weighting: float,
        parameters: Sequence[np.ndarray],
        *,
        compression: _weights.Compression = "faithful",
    ) -> str:
        """Write a learning archive (``.npz`` appended if missing) and return its path."""
        return str(_weights.save_weights(file_path, weighting, parameters, compression=compression))

    @staticmethod
    def save_fields(
        entries: Mapping[str, Any],
        kind: str = _analytics.PAYLOAD_KIND_FEDERATED_ANALYTICS,
        file_path: str | os.PathLike[str] = "fields",
        weighting: float | None = None,
    ) -> str:
        """Write named fields as an archive of ``kind`` and return its path.

        Values are sent as given (``np.asarray``; a scalar becomes one element). Refused
        with ``AnalyticsError``: an unknown kind, no entries, a reserved or ``layer_<n>``
        name, a dtype NPZ cannot store without pickle, a learning archive without
        ``weighting``.
        """
        return str(_analytics.save_fields(file_path, entries, kind, weighting))

    @staticmethod
    def save_analytics(
        columns: Mapping[str, Any],
        file_path: str | os.PathLike[str] = "analytics",
        nan_policy: str = _analytics.NAN_POLICY_OMIT,
    ) -> str:
        """Reduce raw 1-D numeric columns to their six-field bundles; return the path.

        Only the bundle (``_n, _sum, _sumsq, _min, _max, _nan``) is written, never a raw
        value. ``nan_policy`` ``"omit"`` drops NaNs with a warning, ``"raise"`` refuses
        them; an infinity, an empty column and a bundle-name collision are refused.
        """
        return str(_analytics.save_analytics(file_path, columns, nan_policy))

    @staticmethod
    def validate_weight_shape(file: IO[bytes] | str | os.PathLike[str]) -> bool:
        """Check an open ``.npz`` file by its declared kind; rewind it; True or raise.

        Learning: ``weighting`` one value and at least one ``layer_*``; analytics: at
        least one named field, none positional, each at least 1-D with an allowed dtype.
        Raises ``WeightsFormatError`` (``AnalyticsError`` for analytics) saying why.
        """
        try:
            if isinstance(file, (str, os.PathLike)):  # a path too; upstream takes a file
                data: Any = Path(file).read_bytes()
            else:
                data = file.read()
                file.seek(0)
        except (AttributeError, OSError, ValueError) as exc:  # not a file, closed, unseekable
            raise WeightsFormatError(f"cannot read and rewind {file!r}: {exc}") from exc
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise WeightsFormatError(f"expected a binary file, read {type(data).__name__}")
        _analytics.validate_payload(_weights.load_arrays(bytes(data)))
        return True

    @staticmethod
    def convert_pytorch_numpy(
        model: Iterable[Any], weighting: float = 1
    ) -> tuple[float, list[np.ndarray]]:
        """``(weighting, [arrays])`` from ``model.named_parameters()`` or any tensors.

        Items may be ``(name, tensor)`` pairs or bare tensors; a tensor is anything with
        ``.detach().cpu().numpy()``, or a numpy array. Arrays are copies, so training on
        can't change what gets saved.
        """
        params: list[np.ndarray] = []
        for item in model:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                item = item[1]
            params.append(_to_numpy(item))
        return weighting, params

    # ----------------------------------------------------------------- HTTP calls

    def get_run_details(self) -> dict[str, Any]:
        """Read the run details, update ``run_status`` / ``run_number``, return ``data``."""
        branch = urllib.parse.quote(self.branch_id, safe="")
        seq = self._status_seq
        result = self._http.request(
            "GET", self._http.url(f"/api/v1/run/{branch}"), endpoint="run", expect=(200,)
        )
        data = self._data(result, "GET", "run")
        status = data.get("run_status")
        if status not in RUN_STATUSES:
            raise ApiError(
                "GET",
                self._http.url(f"/api/v1/run/{branch}"),
                result.status,
                f"run_status must be one of {RUN_STATUSES}, got {status!r}",
            )
        number = data.get("run_number")
        with self._state_lock:
            # A run_status notification that arrived while we asked is newer than this answer.
            if self._status_seq == seq:
                self._run_status = status
            if isinstance(number, int) and not isinstance(number, bool):
                self._run_number = number
        self._run_changed.set()
        return data

    def get_branch_config(self) -> dict[str, Any]:
        """The branch configuration: the body's ``data``, or the whole body if it has none."""
        branch = urllib.parse.quote(self.branch_id, safe="")
        result = self._http.request(
            "GET",
            self._http.url(f"/api/v1/config/branch/{branch}"),
            endpoint="branch_config",
            expect=(200,),
        )
        body = result.body
        if isinstance(body, dict) and "data" in body:
            return body["data"]  # type: ignore[no-any-return]
        if not isinstance(body, dict):
            raise ApiError("GET", "branch config", result.status, f"not a JSON object: {body!r}")
        return body

    def get_ws_ticket(self) -> dict[str, Any]:
        """A one-use WebSocket ticket: ``{"ticket_id", "request_id", "expires_at"}``."""
        result = self._http.request(
            "POST", self._http.url("/api/v1/ws/ticket"), endpoint="ws_ticket", expect=(200,)
        )
        data = self._data(result, "POST", "ws_ticket")
        if not isinstance(data.get("ticket_id"), str):
            raise ApiError("POST", "ws ticket", result.status, "answer holds no ticket_id")
        return data

    def file_upload(
        self,
        file_path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        training_stats: Any = None,
        device_info: Any = None,
        custom: Any = None,
    ) -> str:
        """Upload an archive of either kind and return its ``file_id`` (PROTOCOL.md 2).

        The file is read once: the digest, the client-side check (chosen by the kind the
        archive declares) and the request body all use the same bytes; the kind goes
        into the metadata as ``"kind"``. Refused with ``RunBlockedError`` when the run is
        not started, unless ``wait_for_run``. ``metadata`` adds keys to the metadata.
        """
        self._check_open()
        if not self._settings.run.wait_for_run:
            self._wait_for_run()  # refuses at once when the run is blocked
        path = Path(file_path)
        try:
            size = path.stat().st_size
            if size > STREAM_THRESHOLD:
                # Large: hashed, checked and sent from disk (issue 17), never held whole;
                # the hash runs beside the check (both release the GIL).
                digest, size, kind = self._digest_and_check(path)
                body_source: bytes | Path = path
            else:
                data = path.read_bytes()
                size = len(data)
                digest = _weights.digest_header(data)
                body_source = data
        except OSError as exc:
            raise WeightsFormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
        if not isinstance(body_source, Path):
            kind = self._check_upload(body_source, digest)
        self._wait_for_run()  # after the checks: never wait long for a file that is bad
        meta = metadata_dict(
            file_size=size,
            file_digest=digest,
            kind=kind,
            device_info=device_info,
            training_stats=training_stats,
            custom=custom,
            extra=metadata,
        )
        form = json.dumps({"leaf_name": self.leaf_name, "metadata": json.dumps(meta)})
        body: bytes | MultipartFileBody
        if isinstance(body_source, Path):
            body, content_type = multipart_file_body(form, path)
        else:
            body, content_type = urllib3.encode_multipart_formdata(
                [("data", form), ("file", (path.name, body_source, "application/octet-stream"))]
            )
        try:
            result = self._http.request(
                "POST",
                self._http.url("/api/v1/file/upload"),
                endpoint="upload",
                expect=(201,),
                data=body,
                headers={
                    "Content-Type": content_type,
                    "x-bk-file-size": str(size),
                    "x-bk-file-digest": digest,
                },
            )
        finally:
            if isinstance(body, MultipartFileBody):
                body.close()
        file_id = self._data(result, "POST", "upload").get("file_id")
        if not isinstance(file_id, str) or not file_id:
            raise ApiError("POST", "upload", result.status, f"answer holds no file_id: {file_id!r}")
        return file_id

    def _check_upload(self, data: bytes, digest: str) -> str:
        """The client-side archive check (PROTOCOL.md section 3), once per distinct content.

        The check is a pure function of the bytes, and the SHA-256 digest names the bytes:
        a leaf that uploads the same archive again (a load test does it hundreds of times
        a second) gets the same verdict without inflating and parsing every member again
        (~0.3 ms of a 10 kB upload's ~1 ms CPU). Only passes are remembered, with the
        kind the archive declares, which is returned.
        """
        key = (digest, len(data))
        kind = self._validated.get(key)
        if kind is not None:
            return kind
        kind = _analytics.validate_payload(_weights.load_arrays(data))
        if len(self._validated) >= _VALIDATED_MEMORY:
            self._validated.clear()
        self._validated[key] = kind
        return kind

    def _digest_and_check(self, path: Path) -> tuple[str, int, str]:
        """(digest, size, kind) of a large file: hashed in a thread while it is checked
        member by member here; a content that passed before is not checked again."""
        with ThreadPoolExecutor(1, thread_name_prefix="bk-upload-digest") as pool:
            hashing = pool.submit(file_digest, path)
            kind: str | None = None
            try:
                kind = check_weights_file(path)
            finally:
                digest, size = hashing.result()
        key = (digest, size)
        if key in self._validated:
            return digest, size, self._validated[key]
        if kind is None:  # not a weights archive: the whole-archive check decides
            kind = _analytics.validate_payload(_weights.load_arrays(path.read_bytes()))
        if len(self._validated) >= _VALIDATED_MEMORY:
            self._validated.clear()
        self._validated[key] = kind
        return digest, size, kind

    def file_download(self, file_id: str) -> str:
        """Download an aggregate to ``<output_dir>/<file_id>.npz`` and return the path.

        Two steps: the API answers a (pre-signed) ``download_url``; a plain GET of it,
        with no credentials, returns the bytes. The file appears atomically.
        """
        self._check_open()
        target = safe_download_path(self._settings.output_dir, file_id)
        quoted = urllib.parse.quote(file_id, safe="")
        result = self._http.request(
            "GET",
            self._http.url(f"/api/v1/file/download/{quoted}"),
            endpoint="download_url",
            expect=(200,),
            accept=ANY_ACCEPT,
        )
        url = self._data(result, "GET", "download_url").get("download_url")
        if not isinstance(url, str) or not url:
            raise ApiError(
                "GET", "download_url", result.status, f"answer holds no download_url: {url!r}"
            )
        try:
            absolute = self._http.resolve(url)
        except ValueError:  # urljoin refuses unbalanced IPv6 brackets
            raise ApiError(
                "GET", "download_url", result.status, "download_url is not a valid URL"
            ) from None
        # Streamed to a temporary file beside the target, then renamed (issue 17: a
        # 1 GB aggregate never sits in memory).
        part = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = self._http.request(
                "GET",
                absolute,
                endpoint="download",
                expect=(200,),
                accept=ANY_ACCEPT,
                authenticated=False,
                parse_json=False,
                stream_to=part,
            )
            if not part.exists() or part.stat().st_size == 0:
                raise ApiError("GET", "download", blob.status, f"empty body for file {file_id}")
            os.replace(part, target)
        except OSError as exc:
            raise ClientError(f"cannot write {target}: {exc.strerror or exc}") from exc
        finally:
            part.unlink(missing_ok=True)
        return str(target)

    def send_performance_metrics(self, aggregation_id: str, data: Any, mode: str = "test") -> bool:
        """Send metrics for an aggregation; True on 201, False otherwise. Never raises.

        ``data`` is a JSON string, or anything ``json.dumps`` takes (then encoded here).
        """
        try:
            if mode not in METRIC_MODES:
                raise ClientConfigError(f"mode must be one of {METRIC_MODES}, got {mode!r}")
            payload = data if isinstance(data, str) else json.dumps(data)
            self._check_open()
            self._http.request(
                "POST",
                self._http.url("/api/v1/performance/analysis"),
                endpoint="metrics",
                expect=(201,),
                json_body={
                    "mode": mode,
                    "aggregation_id": aggregation_id,
                    "leaf_id": self.leaf_id,
                    "branch_id": self.branch_id,
                    "tree_id": self.tree_id,
                    "data": payload,
                },
                parse_json=False,
            )
            return True
        except Exception as exc:  # noqa: BLE001 - the contract: metrics never raise
            _log.warning("sending performance metrics failed: %s", exc)
            return False

    # ----------------------------------------------------------------- notifications

    def get_latest_aggregation_id(self) -> str | None:
        """Take the newest unread aggregation id without blocking; None when there is none."""
        try:
            latest: str = self._queue.get_nowait()
        except _queue.Empty:
            return None
        return latest

    def _on_notification(self, msg: dict[str, Any]) -> None:
        """Handle one notification (PROTOCOL.md section 4); never raises."""
        try:
            note = parse_notification(msg)
        except ValueError as exc:
            _log.warning("ignoring malformed notification: %s", exc)
            return
        try:
            if note.message_type == "aggregation_status":
                self._queue.put(note.value)
            else:
                with self._state_lock:
                    self._run_status = note.value
                    self._status_seq += 1
                self._run_changed.set()
                if note.value == "start" and not self._closed.is_set():
                    # Off the consumer's thread: an HTTP call with retries there would
                    # starve AMQP heartbeats / WebSocket pings for as long as it takes.
                    threading.Thread(
                        target=self._refresh_run_details,
                        name=f"bk-run-refresh-{self.leaf_id}",
                        daemon=True,
                    ).start()
            self._events.emit("notification", message_type=note.message_type, value=note.value)
        except Exception:  # noqa: BLE001 - a consumer thread must never die of a message
            _log.exception("handling a %s notification failed", note.message_type)

    def _refresh_run_details(self) -> None:
        """Re-read run details after a ``start`` notification (so ``run_number`` advances)."""
        with self._refresh_lock:
            if self._closed.is_set():
                return
            try:
                self.get_run_details()
            except BkSimError as exc:
                _log.warning("re-reading run details after start failed: %s", exc)
            except Exception:  # noqa: BLE001 - a background thread must not die noisily
                _log.exception("re-reading run details after start failed")
            finally:
                self._refreshed.set()

    def _make_consumer(self) -> NotificationConsumer:
        s = self._settings
        spec = ConsumerSpec(
            transport="websocket" if s.use_websocket else "amqp",
            credentials=self._credentials,
            rabbitmq=s.rabbitmq,
            broker_host=s.broker_host,
            websocket=s.websocket,
            websocket_url=s.websocket_url,
            verify_ssl=self._http.verify,
            get_ticket=self.get_ws_ticket,
            on_message=self._on_notification,
            events=self._events,
        )
        consumer = self._consumer_factory(spec)
        for name in ("start", "close"):
            if not callable(getattr(consumer, name, None)):
                raise ClientConfigError(
                    f"consumer_factory returned {type(consumer).__name__}, which has no {name}()"
                )
        return consumer

    # ----------------------------------------------------------------- run gate

    def _wait_for_run(self) -> None:
        """Return when the run is started; else refuse, or wait if ``wait_for_run``."""
        run = self._settings.run
        while True:
            self._run_changed.clear()  # before the check, so no wake-up is lost
            if self._run_status == "start":
                return
            if not run.wait_for_run:
                raise RunBlockedError(
                    f"run is blocked: run_status is {self._run_status!r}, not 'start' "
                    f"(leaf {self.leaf_id})"
                )
            self._events.emit("run_wait", value=self._run_status, delay_s=run.check_interval_s)
            _log.info("run is %s; checking again in %s s", self._run_status, run.check_interval_s)
            self._run_changed.wait(run.check_interval_s)
            if self._closed.is_set():
                raise RunBlockedError("run is blocked: the client closed while waiting")
            if self._run_status != "start":
                self.get_run_details()

    # ----------------------------------------------------------------- lifecycle

    def disable_ssl_verification(self, enabled: bool = False) -> bool:
        """Set TLS certificate verification for HTTP (and a WebSocket started later).

        The published client's name and meaning: ``enabled`` is the new state (so the
        default turns verification off), and the state is returned.
        """
        if not isinstance(enabled, bool):
            raise ClientConfigError(f"enabled must be True or False, got {enabled!r}")
        if not enabled:
            _log.warning("TLS certificate verification is disabled for %s", self._settings.api.host)
        self._http.verify = enabled
        return enabled

    def close(self, timeout: float = _CONSUMER_CLOSE_TIMEOUT) -> None:
        """Stop the consumer, wake any waits and release connections; prompt, idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._run_changed.set()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(timeout=timeout)
            except Exception:  # noqa: BLE001 - close must not raise
                _log.warning("closing the notification consumer failed", exc_info=True)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ClientError(f"the client of leaf {self.leaf_id} is closed")

    @staticmethod
    def _data(result: HttpResult, method: str, endpoint: str) -> dict[str, Any]:
        """The ``data`` object of a success body; ``ApiError`` when the shape is wrong."""
        body = result.body
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise ApiError(
                method, endpoint, result.status, f"answer has no 'data' object: {body!r:.200}"
            )
        return body["data"]  # type: ignore[no-any-return]
