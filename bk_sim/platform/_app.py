"""The platform's HTTP surface: leaf API (PROTOCOL.md 2 and 4b), admin API, health.

One middleware wraps every request: it authenticates leaf calls, injects the branch's
HTTP faults, turns refusals into ``{"error": ...}`` bodies and counts each answered leaf
request for ``GET /admin/v1/stats``. Handlers stay short: parse, call the store or the
round manager, answer.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from bk_sim import __version__
from bk_sim.broker import DEFAULT_MANAGEMENT_URL
from bk_sim.errors import BrokerError, PlatformError, WeightsFormatError
from bk_sim.platform._aggregate import STRATEGIES
from bk_sim.platform._analytics import (
    FEDERATED_ANALYTICS,
    AnalyticsRefusal,
    FieldsInfo,
    check_field_ops,
    metadata_kind,
    upload_kind,
    validate_fields,
)
from bk_sim.platform._faults import BranchFaults, FaultSpecError, HttpFault, is_finite
from bk_sim.platform._guard import ConnectionGuard
from bk_sim.platform._limits import UPLOAD_BUFFER_BYTES, BudgetExhausted, ByteBudget, Limits
from bk_sim.platform._logsafe import install_log_filters
from bk_sim.platform._notify import (
    WS_HEARTBEAT_S,
    AmqpPublisher,
    Notifier,
    Provisioner,
    WsHub,
    message,
)
from bk_sim.platform._requests import ascii_header, busy, json_body, parse_json
from bk_sim.platform._rounds import RequestRejected, RoundManager
from bk_sim.platform._signing import UrlSigner, load_or_create_secret
from bk_sim.platform._store import Leaf, Store, is_file_id, new_id
from bk_sim.platform._upload import MULTIPART_SLACK, Received, check_digest, receive_upload
from bk_sim.platform._zipstream import validate_stored
from bk_sim.weights import WeightsInfo

log = logging.getLogger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_DECOMPRESSED_BYTES = 2 * 1024 * 1024 * 1024
_MAX_SQL_INT = 2**63 - 1  # SQLite INTEGER; a larger Python int raises OverflowError (a 500)
_HEALTH_CACHE_S = 2.0
# Endpoint names as the client's events use them: "download_url" asks for a signed URL,
# "download" fetches the bytes from it.
LEAF_ENDPOINTS = frozenset(
    {"upload", "download", "download_url", "run", "metrics", "branch_config", "ws_ticket", "ws"}
)
_BEARER_ENDPOINTS = LEAF_ENDPOINTS - {"download", "ws"}
RUN_STATUSES = ("start", "pause", "stop")
METRIC_MODES = ("test", "train", "non-federated")

PLATFORM_KEY: web.AppKey[Platform] = web.AppKey("platform")


@dataclass(frozen=True)
class PlatformConfig:
    """Everything ``serve`` needs; the CLI and ``start_platform`` build one."""

    data_dir: Path
    admin_token: str
    amqp_url: str = DEFAULT_AMQP_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    no_amqp: bool = False
    public_url: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
    url_ttl_s: float = 300.0
    limits: Limits = Limits()

    def __post_init__(self) -> None:
        # An empty token would let "Authorization: Bearer " (or "Bearer") into the admin API.
        if not self.admin_token.strip():
            raise PlatformError(
                "the admin token must not be empty (--admin-token / BK_SIM_ADMIN_TOKEN)"
            )


class _Dropped(Exception):
    """The request was handled but its connection is to be dropped without an answer."""


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"data": data}, status=status)


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers)


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object, read under the platform's memory budget (for handlers
    that are not ``Platform`` methods; methods use ``self._json``)."""
    platform = request.app[PLATFORM_KEY]
    return await json_body(request, platform.budget, platform.config.limits.max_json_bytes)


def _validate_and_keep(
    received: Received, target: Path, max_decompressed: int, declared_kind: str | None = None
) -> WeightsInfo | FieldsInfo:
    """Runs in a validation thread: validate the stored upload by its kind, then move it in."""
    # -- FA hook: the payload kind picks the validation (docs/analytics.md)
    try:
        if upload_kind(received.path, declared_kind) == FEDERATED_ANALYTICS:
            fields = validate_fields(received.path, max_decompressed)
            received.path.replace(target)
            return fields
    except AnalyticsRefusal as exc:
        raise RequestRejected(400, f"federated analytics upload refused: {exc}") from exc
    # -- end FA hook
    try:
        info = validate_stored(received.path, max_decompressed)
    except WeightsFormatError as exc:
        raise RequestRejected(400, f"invalid weights file: {exc}") from exc
    received.path.replace(target)
    return info


def _client_gone(request: web.BaseRequest, exc: BaseException) -> bool:
    """The client hung up (mid-body or before the answer): not the platform's error."""
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return True
    transport = request.transport
    gone = transport is None or transport.is_closing()
    return gone and isinstance(exc, (ConnectionError, OSError, EOFError, ValueError))


class _AccessLogger(AbstractAccessLogger):
    """Method, path (never the query: it holds signatures and tickets), status, time."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms", request.method, request.path, response.status, time * 1000
        )


class Platform:
    """The running platform's state, shared by every handler."""

    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        self.store = Store(config.data_dir)
        self.signer = UrlSigner(
            load_or_create_secret(config.data_dir / "url-signing.key"), ttl_s=config.url_ttl_s
        )
        self.hub = WsHub()
        self.publisher = None if config.no_amqp else AmqpPublisher(config.amqp_url)
        self.provisioner = (
            None if config.no_amqp else Provisioner(config.management_url, config.amqp_url)
        )
        self.notifier = Notifier(self.publisher, self.hub)
        self.faults: dict[str, BranchFaults] = {}
        self.stats: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.leaves: dict[str, Leaf] = {leaf.id: leaf for leaf in self.store.leaves()}
        self.io_pool = ThreadPoolExecutor(4, thread_name_prefix="bk-sim-io")
        # Upload bytes to disk on their own threads: a slow broker call (provisioning on
        # io_pool) must not hold up every tenant's uploads.
        self.disk_pool = ThreadPoolExecutor(4, thread_name_prefix="bk-sim-disk")
        self.validate_pool = ThreadPoolExecutor(
            config.limits.validation_workers, thread_name_prefix="bk-sim-validate"
        )
        self.guard = ConnectionGuard(config.limits)
        self.budget = ByteBudget(config.limits.max_inflight_bytes, config.limits.inflight_wait_s)
        self.agg_pool = ThreadPoolExecutor(1, thread_name_prefix="bk-sim-aggregate")
        self.rounds = RoundManager(
            self.store,
            self.notifier,
            self.faults.get,
            self.agg_pool,
            max_decompressed_bytes=config.max_decompressed_bytes,
        )
        self._health: tuple[float, str] = (0.0, "unknown")
        self._tasks: set[asyncio.Task[None]] = set()

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def on_disk(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.disk_pool, fn, *args)

    async def in_validator(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.validate_pool, fn, *args)

    async def startup(self, _app: web.Application) -> None:
        self.guard.start()
        self.store.clear_incoming()
        if self.publisher is not None and self.provisioner is not None:
            await self.in_thread(self.provisioner.check)
            await self.in_thread(self.publisher.check)
            self.publisher.start()
            self._health = (time.monotonic(), "ok")
        await self.rounds.resume()
        log.info("platform ready: data in %s", self.config.data_dir)

    async def shutdown(self, _app: web.Application) -> None:
        """Close WebSockets first: aiohttp waits for open handlers before cleanup."""
        await self.hub.close_all()

    async def cleanup(self, _app: web.Application) -> None:
        await self.rounds.shutdown()
        await self.guard.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self.publisher is not None:
            await self.in_thread(self.publisher.stop)
        if self.provisioner is not None:
            self.provisioner.close()
        self.io_pool.shutdown(wait=True)
        self.validate_pool.shutdown(wait=True)
        self.disk_pool.shutdown(wait=True)
        self.agg_pool.shutdown(wait=True)
        self.store.close()

    async def broker_health(self) -> str:
        if self.provisioner is None:
            return "disabled"
        checked, state = self._health
        if time.monotonic() - checked < _HEALTH_CACHE_S:
            return state
        try:
            await self.in_thread(self.provisioner.check)
            state = "ok"
        except BrokerError as exc:
            log.warning("broker health check failed: %s", exc)
            state = "unreachable"
        self._health = (time.monotonic(), state)
        return state

    async def provision(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.provisioner is None:
            return
        try:
            await self.in_thread(fn, *args)
        except BrokerError as exc:
            raise RequestRejected(502, f"RabbitMQ provisioning failed: {exc}") from exc

    async def notify(self, branch: dict[str, Any], text: str) -> None:
        """Send to every leaf of the branch; waits unless a delay fault is set."""
        faults = self.faults.get(branch["id"])
        leaf_ids = [leaf.id for leaf in self.store.leaves(branch["id"])]
        task = asyncio.get_running_loop().create_task(
            self.notifier.notify(branch, leaf_ids, text, faults)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if faults is None or faults.notifications.delay_s <= 0:
            await task

    # ------------------------------------------------------------------ middleware

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = request.match_info.route
        name = getattr(route, "name", None)
        self.guard.request_started(request)
        task = asyncio.current_task()
        if task is not None:
            # aiohttp runs each request in its own task, which ends once the answer is
            # written: only then is the connection idle (a long download is not).
            task.add_done_callback(lambda _t: self._request_done(request))
        return await self._answer(request, handler, name)

    def _request_done(self, request: web.Request) -> None:
        """After the answer was written (or not): the connection is idle, and a counted
        upload whose 201 reached the socket is acknowledged."""
        self.guard.request_finished(request)
        file_id = request.get("counted_upload")
        transport = request.transport
        if file_id is not None and transport is not None and not transport.is_closing():
            try:
                self.store.mark_acked(file_id)
            except Exception:  # the store is closing (shutdown): the retry rule copes
                log.debug("could not mark upload %s acknowledged", file_id, exc_info=True)

    async def _answer(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        name: str | None,
    ) -> web.StreamResponse:
        try:
            response = await self._guarded(request, handler, name)
        except _Dropped:
            # The transport is already aborted: aiohttp ignores the write of this answer.
            self.stats[name or "?"]["dropped"] += 1
            return _error(599, "connection dropped by fault injection")
        except RequestRejected as exc:
            response = _error(exc.status, str(exc), exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error(exc.status, exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _client_gone(request, exc):
                log.info("client hung up during %s %s: %r", request.method, request.path, exc)
                if name in LEAF_ENDPOINTS:
                    self.stats[name]["disconnected"] += 1
                return _error(499, "client closed the connection")
            log.exception("unexpected error in %s %s", request.method, request.path)
            response = _error(500, "internal platform error (see the platform log)")
        if name in LEAF_ENDPOINTS:
            self.stats[name][str(response.status)] += 1
        return response

    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        name: str | None,
    ) -> web.StreamResponse:
        if name not in LEAF_ENDPOINTS:
            return await handler(request)
        branch_id: str | None = None
        if name in _BEARER_ENDPOINTS:
            leaf = self._authenticate(request)
            request["leaf"] = leaf
            branch_id = leaf.branch_id
        elif name == "download":
            file_id = request.match_info.get("file_id", "")
            row = self.store.file(file_id) if is_file_id(file_id) else None
            branch_id = row["branch_id"] if row else None
        faults = self.faults.get(branch_id) if branch_id else None
        rule = faults.pick_http(name) if faults is not None and name != "ws" else None
        if rule is not None:
            await self._inject_before(request, rule)
        try:
            response = await handler(request)
        except RequestRejected:
            if rule is None or not rule.drop_response:
                raise
            response = None  # a refusal is an answer too, and it is lost as well
        if rule is not None and rule.drop_response:
            _abort(request)  # the work is done; the answer is lost
            raise _Dropped()
        assert response is not None
        return response

    async def _inject_before(self, request: web.Request, rule: HttpFault) -> None:
        if rule.latency_s > 0:
            await asyncio.sleep(rule.latency_s)
        if rule.reset:
            _abort(request)
            raise _Dropped()
        if rule.status is not None and not rule.drop_response:
            headers = None
            if rule.retry_after is not None:
                headers = {"Retry-After": str(int(math.ceil(rule.retry_after)))}
            raise RequestRejected(rule.status, f"injected fault: HTTP {rule.status}", headers)

    def _authenticate(self, request: web.Request) -> Leaf:
        header = ascii_header(request, "Authorization")
        scheme, _, cred = header.partition(" ")
        leaf_id, sep, token = cred.strip().partition(":")
        if scheme.lower() != "bearer" or not sep or not leaf_id or not token:
            raise RequestRejected(
                401,
                "missing or malformed Authorization header; expected "
                "'Bearer <leaf_id>:<session_token>'",
            )
        leaf = self.leaves.get(leaf_id)
        if leaf is None or not leaf.token_matches(token):
            raise RequestRejected(401, "invalid leaf credentials")
        return leaf

    def _admin(self, request: web.Request) -> None:
        header = ascii_header(request, "Authorization")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.config.admin_token.encode()
        )
        if not ok:
            raise RequestRejected(401, "missing or wrong admin bearer token")

    async def _json(self, request: web.Request) -> dict[str, Any]:
        return await json_body(request, self.budget, self.config.limits.max_json_bytes)

    def _own_branch(self, request: web.Request) -> dict[str, Any]:
        leaf: Leaf = request["leaf"]
        branch_id = request.match_info["branch_id"]
        branch = self.store.branch(branch_id) if branch_id == leaf.branch_id else None
        if branch is None:
            raise RequestRejected(404, f"no branch {branch_id!r} for this leaf")
        return branch

    # ------------------------------------------------------------------ leaf API

    async def healthz(self, request: web.Request) -> web.Response:
        broker = await self.broker_health()
        status = 503 if broker == "unreachable" else 200
        return web.json_response(
            {
                "data": {
                    "status": "ok" if status == 200 else "degraded",
                    "store": "ok",
                    "broker": broker,
                }
            },
            status=status,
        )

    async def run_details(self, request: web.Request) -> web.Response:
        branch = self._own_branch(request)
        return _ok({"run_status": branch["run_status"], "run_number": branch["run_number"]})

    async def branch_config(self, request: web.Request) -> web.Response:
        branch = self._own_branch(request)
        return _ok(
            {
                "branch": {
                    "id": branch["id"],
                    "name": branch["name"],
                    "tree_id": branch["tree_id"],
                    **_config_view(branch),
                    "run_status": branch["run_status"],
                    "run_number": branch["run_number"],
                    "leaves": self.store.leaf_count(branch["id"]),
                },
                "service": {
                    "name": "bk-sim reference platform",
                    "version": __version__,
                    "strategies": list(STRATEGIES),
                },
                "model_config": branch["model_config"],
                "created_at": branch["created_at"],
                "updated_at": branch["updated_at"],
            }
        )

    async def upload(self, request: web.Request) -> web.Response:
        leaf: Leaf = request["leaf"]
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit + MULTIPART_SLACK:
            raise RequestRejected(
                413,
                f"request body of {request.content_length} bytes is over the upload "
                f"limit of {limit} bytes",
            )
        declared = _declared_size(request.headers.get("x-bk-file-size"), limit)
        branch = self.store.branch(leaf.branch_id)
        if branch is None or branch["run_status"] != "start":
            status = branch["run_status"] if branch else "gone"
            raise RequestRejected(409, f"the run is not started (run_status is {status!r})")
        try:
            held = await self.budget.acquire(
                min(request.content_length or UPLOAD_BUFFER_BYTES, UPLOAD_BUFFER_BYTES)
            )
        except BudgetExhausted as exc:
            raise busy(exc) from exc
        received: Received | None = None
        try:
            received = await receive_upload(
                request, incoming=self.store.incoming_dir, limit=limit, run=self.on_disk
            )
            await self.budget.release(held)
            held = 0
            return await self._keep_upload(request, leaf, received, declared)
        finally:
            await self.budget.release(held)
            if received is not None:
                received.path.unlink(missing_ok=True)  # moved into place unless refused

    async def _keep_upload(
        self, request: web.Request, leaf: Leaf, received: Received, declared: int | None
    ) -> web.Response:
        if declared is not None and declared != received.size:
            raise RequestRejected(
                400, f"x-bk-file-size says {declared} bytes but the file part has {received.size}"
            )
        declared_kind: str | None = None
        if received.form is not None:
            meta = parse_json(received.form, "form field 'data'")
            if not isinstance(meta, dict):
                raise RequestRejected(400, "form field 'data' must be a JSON object")
            try:  # FA hook: the kind the metadata declares
                declared_kind = metadata_kind(meta)
            except AnalyticsRefusal as exc:
                raise RequestRejected(400, f"federated analytics upload refused: {exc}") from exc
        check_digest(request.headers.get("x-bk-file-digest"), received.sha256)
        file_id = new_id()
        target = self.store.file_path(file_id)
        info = await self.in_validator(
            _validate_and_keep,
            received,
            target,
            self.config.max_decompressed_bytes,
            declared_kind,
        )
        try:
            kept_id, is_new = await self.rounds.submit(
                leaf, file_id=file_id, digest=received.digest, size=received.size, info=info
            )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if not is_new:
            target.unlink(missing_ok=True)
        else:
            request["counted_upload"] = kept_id
        return _ok({"file_id": kept_id}, status=201)

    async def download(self, request: web.Request) -> web.Response:
        leaf: Leaf = request["leaf"]
        file_id = request.match_info["file_id"]
        if not is_file_id(file_id):
            raise RequestRejected(400, f"unsafe or malformed file id {file_id!r}")
        row = self.store.file(file_id)
        if row is None or row["branch_id"] != leaf.branch_id:
            raise RequestRejected(404, f"no file {file_id} for this leaf")
        base = self.config.public_url or f"{request.scheme}://{request.host}"
        url = f"{base.rstrip('/')}/files/{file_id}?{self.signer.query(file_id)}"
        return _ok({"download_url": url})

    async def signed_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if not is_file_id(file_id):
            raise RequestRejected(400, f"unsafe or malformed file id {file_id!r}")
        q = request.query
        if not self.signer.verify(file_id, q.get("expires", ""), q.get("sig", "")):
            raise RequestRejected(403, "download URL is expired or its signature is wrong")
        path = self.store.file_path(file_id)
        if self.store.file(file_id) is None or not path.is_file():
            raise RequestRejected(404, f"no file {file_id}")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})

    async def metrics(self, request: web.Request) -> web.Response:
        leaf: Leaf = request["leaf"]
        body = await self._json(request)
        mode = body.get("mode")
        if mode not in METRIC_MODES:
            raise RequestRejected(400, f"mode must be one of {', '.join(METRIC_MODES)}")
        for key, own in (
            ("branch_id", leaf.branch_id),
            ("leaf_id", leaf.id),
            ("tree_id", leaf.tree_id),
        ):
            if body.get(key) not in (None, own):
                raise RequestRejected(403, f"{key} {body.get(key)!r} is not this leaf's")
        data = body.get("data", "")
        if not isinstance(data, str):
            data = json.dumps(data)
        agg = body.get("aggregation_id")
        lim = self.config.limits
        count, used = self.store.metrics_usage(leaf.id)
        if count >= lim.max_metrics_per_leaf:
            raise RequestRejected(
                429,
                f"this leaf already stored {count} metrics, the limit is "
                f"{lim.max_metrics_per_leaf}",
                {"Retry-After": "60"},
            )
        size = len(data.encode("utf-8", "surrogatepass"))
        if used + size > lim.max_metrics_bytes_per_leaf:
            raise RequestRejected(
                413,
                f"this leaf's metrics would take {used + size} bytes, over the limit of "
                f"{lim.max_metrics_bytes_per_leaf}",
            )
        metric_id = self.store.add_metrics(
            leaf.branch_id, leaf.id, mode, None if agg is None else str(agg), data
        )
        return _ok({"metric_id": metric_id}, status=201)

    async def ws_ticket(self, request: web.Request) -> web.Response:
        leaf: Leaf = request["leaf"]
        ticket_id, request_id = secrets.token_urlsafe(24), new_id()
        expires = self.hub.issue_ticket(leaf.id, ticket_id, request_id)
        return _ok(
            {
                "ticket_id": ticket_id,
                "request_id": request_id,
                "expires_at": datetime.fromtimestamp(expires, timezone.utc).isoformat(),
            }
        )

    async def ws(self, request: web.Request) -> web.StreamResponse:
        leaf_id = self.hub.redeem(
            request.query.get("ticket", ""), request.query.get("request_id", "")
        )
        if leaf_id is None or leaf_id not in self.leaves:
            raise RequestRejected(401, "WebSocket ticket is unknown, used or expired")
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S)
        self.guard.exempt(request)  # long-lived: the heartbeat bounds it, not a timeout
        await ws.prepare(request)
        try:
            await self.hub.attach(leaf_id, ws)
            async for _ in ws:
                pass  # leaves send nothing we act on
        finally:
            self.hub.detach(leaf_id, ws)
        return ws

    # ------------------------------------------------------------------ admin API

    async def admin_create_tree(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._json(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise RequestRejected(400, "name must be a non-empty string")
        tree = self.store.create_tree(name)
        if self.provisioner is not None:
            try:
                await self.provision(self.provisioner.create_tree, tree["id"])
            except RequestRejected:
                self.store.delete_tree(tree["id"])
                raise
        return _ok({"tree_id": tree["id"], "name": name}, status=201)

    async def admin_delete_tree(self, request: web.Request) -> web.Response:
        self._admin(request)
        tree_id = request.match_info["tree_id"]
        if self.store.tree(tree_id) is None:
            raise RequestRejected(404, f"no tree {tree_id}")
        branch_ids = self.store.branch_ids(tree_id)
        leaf_ids, file_ids = self.store.delete_tree(tree_id)
        # At once, before the broker calls: the tree's aggregations, publishes and
        # WebSockets stop now, and nothing of it waits in front of another tree.
        self.rounds.forget_branches(branch_ids)
        for branch_id in branch_ids:
            self.faults.pop(branch_id, None)
        for leaf_id in leaf_ids:
            self.leaves.pop(leaf_id, None)
        self.hub.drop_leaves(leaf_ids)
        if self.publisher is not None:
            self.publisher.forget_vhost(tree_id)
        if self.provisioner is not None:
            await self.provision(self.provisioner.delete_tree, tree_id, leaf_ids)
        for file_id in file_ids:
            self.store.file_path(file_id).unlink(missing_ok=True)
        return _ok({"tree_id": tree_id, "deleted_leaves": len(leaf_ids)})

    async def admin_create_branch(self, request: web.Request) -> web.Response:
        self._admin(request)
        body = await self._json(request)
        tree_id = body.get("tree_id")
        if not isinstance(tree_id, str) or self.store.tree(tree_id) is None:
            raise RequestRejected(404, f"no tree {tree_id!r}")
        name = body.get("name") or "branch"
        if not isinstance(name, str):
            raise RequestRejected(400, "name must be a string")
        config = _parse_config(
            {k: v for k, v in body.items() if k not in ("tree_id", "name")},
            base={
                "strategy": "fedavg",
                "quorum": None,
                "round_timeout_s": None,
                "trim_fraction": 0.1,
                "model_config": {},
                "field_ops": {},
            },
        )
        branch = self.store.create_branch(tree_id, name, config)
        if self.provisioner is not None:
            await self.provision(self.provisioner.create_branch, tree_id, branch["id"])
        return _ok(_branch_view(branch), status=201)

    async def admin_branch(self, request: web.Request) -> web.Response:
        self._admin(request)
        return _ok(_branch_view(self._branch(request)))

    async def admin_create_leaves(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        body = await self._json(request)
        count = body.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10_000:
            raise RequestRejected(400, "count must be an integer from 1 to 10000")
        prefix = body.get("name_prefix", "leaf")
        if not isinstance(prefix, str):
            raise RequestRejected(400, "name_prefix must be a string")
        start = self.store.leaf_count(branch["id"])
        fresh = [(new_id(), secrets.token_urlsafe(32)) for _ in range(count)]
        if self.provisioner is not None:
            await self.provision(
                self.provisioner.create_leaves, branch["tree_id"], branch["id"], fresh
            )
        out = []
        for i, (leaf_id, token) in enumerate(fresh):
            leaf = self.store.add_leaf(branch, leaf_id, f"{prefix}-{start + i}", token)
            self.leaves[leaf.id] = leaf
            out.append(
                {
                    "id": leaf.id,
                    "name": leaf.name,
                    "session_token": token,
                    "owner_id": leaf.owner_id,
                    "tree_id": leaf.tree_id,
                    "branch_id": leaf.branch_id,
                }
            )
        return _ok({"leaves": out}, status=201)

    async def admin_set_run(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        body = await self._json(request)
        status = body.get("run_status")
        if status not in RUN_STATUSES:
            raise RequestRejected(400, f"run_status must be one of {', '.join(RUN_STATUSES)}")
        previous = branch["run_status"]
        number = branch["run_number"] + (1 if status == "start" else 0)
        branch = self.store.update_branch(branch["id"], run_status=status, run_number=number)
        if status == "start" and previous == "stop":
            # A stopped run's open round would wait for ever for uploads that are not
            # coming (or arrive with another layout): a start after a stop abandons it.
            # A start after a pause resumes the round.
            await self.rounds.run_started(branch["id"], number)
        await self.notify(branch, message("run_status", run_status=status))
        return _ok({"run_status": status, "run_number": number})

    async def admin_config(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        if request.method == "PUT":
            config = _parse_config(await self._json(request), base=_config_view(branch))
            branch = self.store.update_branch(branch["id"], **config)
            await self.rounds.config_changed(branch["id"])
        return _ok(_config_view(branch))

    async def admin_rounds(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        after, limit = self._page(request)
        numbers = self.store.round_numbers(branch["id"], after=after, limit=limit + 1)
        more = len(numbers) > limit
        numbers = numbers[:limit]
        records = [self.store.round_record(branch["id"], n) for n in numbers]
        return _ok({"rounds": records, "next_after": numbers[-1] if more else None})

    async def admin_round(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        try:
            number = int(request.match_info["number"])
        except ValueError as exc:
            raise RequestRejected(400, "round number must be an integer") from exc
        if not 0 <= number <= _MAX_SQL_INT:
            raise RequestRejected(404, f"branch {branch['id']} has no round {number}")
        record = self.store.round_record(branch["id"], number)
        if record is None:
            raise RequestRejected(404, f"branch {branch['id']} has no round {number}")
        return _ok(record)

    async def admin_faults(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        if request.method == "PUT":
            try:
                self.faults[branch["id"]] = BranchFaults.from_json(await self._json(request))
            except FaultSpecError as exc:
                raise RequestRejected(400, f"bad faults: {exc}") from exc
        current = self.faults.get(branch["id"]) or BranchFaults()
        return _ok(current.to_json())

    async def admin_stats(self, request: web.Request) -> web.Response:
        self._admin(request)
        if request.method == "DELETE":
            self.stats.clear()
        return _ok(
            {
                "requests": {k: dict(v) for k, v in self.stats.items()},
                "connections": self.guard.snapshot(),
                "inflight_bytes": {"used": self.budget.used, "peak": self.budget.peak},
            }
        )

    async def admin_metrics(self, request: web.Request) -> web.Response:
        self._admin(request)
        branch = self._branch(request)
        after, limit = self._page(request)
        rows = self.store.metrics(branch["id"], after=after, limit=limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return _ok({"metrics": rows, "next_after": rows[-1]["id"] if more else None})

    def _page(self, request: web.Request) -> tuple[int, int]:
        """``?after=<cursor>&limit=<n>`` of an admin listing, checked."""
        lim = self.config.limits
        try:
            after = int(request.query.get("after", "0"))
            limit = int(request.query.get("limit", str(lim.page_size)))
        except ValueError as exc:
            raise RequestRejected(400, "after and limit must be integers") from exc
        if not 0 <= after <= _MAX_SQL_INT:
            raise RequestRejected(400, "after must be an integer >= 0")
        if not 1 <= limit <= lim.max_page_size:
            raise RequestRejected(400, f"limit must be from 1 to {lim.max_page_size}")
        return after, limit

    def _branch(self, request: web.Request) -> dict[str, Any]:
        branch_id = request.match_info["branch_id"]
        branch = self.store.branch(branch_id)
        if branch is None:
            raise RequestRejected(404, f"no branch {branch_id}")
        return branch


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _declared_size(header: str | None, limit: int) -> int | None:
    if header is None:
        return None
    try:
        size = int(header)
    except ValueError as exc:
        raise RequestRejected(400, f"x-bk-file-size must be an integer, got {header!r}") from exc
    if size < 0:
        raise RequestRejected(400, "x-bk-file-size must not be negative")
    if size > limit:
        raise RequestRejected(
            413, f"x-bk-file-size {size} is over the upload limit of {limit} bytes"
        )
    return size


def _config_view(branch: dict[str, Any]) -> dict[str, Any]:
    return {
        "strategy": branch["strategy"],
        "quorum": branch["quorum"],
        "round_timeout_s": branch["round_timeout_s"],
        "trim_fraction": branch["trim_fraction"],
        "model_config": branch["model_config"],
        "field_ops": branch.get("field_ops", {}),  # FA
    }


def _branch_view(branch: dict[str, Any]) -> dict[str, Any]:
    return {
        "branch_id": branch["id"],
        "tree_id": branch["tree_id"],
        "name": branch["name"],
        **_config_view(branch),
        "run_status": branch["run_status"],
        "run_number": branch["run_number"],
        "created_at": branch["created_at"],
        "updated_at": branch["updated_at"],
    }


def _parse_config(body: dict[str, Any], *, base: dict[str, Any]) -> dict[str, Any]:
    """Merge a (partial) branch config into ``base``; 400 naming the first bad field."""
    unknown = set(body) - set(base)
    if unknown:
        raise RequestRejected(400, f"unknown config keys: {', '.join(sorted(unknown))}")
    config = {**base, **body}
    if config["strategy"] not in STRATEGIES:
        raise RequestRejected(400, f"strategy must be one of {', '.join(STRATEGIES)}")
    quorum = config["quorum"]
    if quorum is not None and (
        not isinstance(quorum, int) or isinstance(quorum, bool) or not 1 <= quorum <= _MAX_SQL_INT
    ):
        raise RequestRejected(400, "quorum must be null or an integer >= 1 (and < 2**63)")
    timeout = config["round_timeout_s"]
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not is_finite(timeout)
        or timeout <= 0
    ):
        raise RequestRejected(400, "round_timeout_s must be null or a number > 0")
    trim = config["trim_fraction"]
    if isinstance(trim, bool) or not isinstance(trim, (int, float)) or not 0 <= trim < 0.5:
        raise RequestRejected(400, "trim_fraction must be a number in [0, 0.5)")
    if not isinstance(config["model_config"], dict):
        raise RequestRejected(400, "model_config must be a JSON object")
    if "field_ops" in config:  # FA: {field name: sum | min | max | must_match}
        try:
            config["field_ops"] = check_field_ops(config["field_ops"])
        except ValueError as exc:
            raise RequestRejected(400, str(exc)) from exc
    config["trim_fraction"] = float(trim)
    config["round_timeout_s"] = None if timeout is None else float(timeout)
    return config


def build_app(config: PlatformConfig) -> web.Application:
    """The aiohttp application; its startup connects to the broker and resumes rounds."""
    install_log_filters()
    platform = Platform(config)
    app = web.Application(
        middlewares=[platform.middleware], client_max_size=config.limits.max_json_bytes
    )
    app[PLATFORM_KEY] = platform
    app.on_startup.append(platform.startup)
    app.on_shutdown.append(platform.shutdown)
    app.on_cleanup.append(platform.cleanup)
    p = platform
    r = app.router
    r.add_get("/healthz", p.healthz, name="healthz")
    r.add_get("/api/v1/run/{branch_id}", p.run_details, name="run")
    r.add_post("/api/v1/file/upload", p.upload, name="upload")
    r.add_get("/api/v1/file/download/{file_id}", p.download, name="download_url")
    r.add_post("/api/v1/performance/analysis", p.metrics, name="metrics")
    r.add_get("/api/v1/config/branch/{branch_id}", p.branch_config, name="branch_config")
    r.add_post("/api/v1/ws/ticket", p.ws_ticket, name="ws_ticket")
    r.add_get("/api/v1/ws", p.ws, name="ws")
    r.add_get("/files/{file_id}", p.signed_file, name="download")
    r.add_post("/admin/v1/trees", p.admin_create_tree)
    r.add_delete("/admin/v1/trees/{tree_id}", p.admin_delete_tree)
    r.add_post("/admin/v1/branches", p.admin_create_branch)
    r.add_get("/admin/v1/branches/{branch_id}", p.admin_branch)
    r.add_post("/admin/v1/branches/{branch_id}/leaves", p.admin_create_leaves)
    r.add_put("/admin/v1/branches/{branch_id}/run", p.admin_set_run)
    r.add_get("/admin/v1/branches/{branch_id}/config", p.admin_config)
    r.add_put("/admin/v1/branches/{branch_id}/config", p.admin_config)
    r.add_get("/admin/v1/branches/{branch_id}/rounds", p.admin_rounds)
    r.add_get("/admin/v1/branches/{branch_id}/rounds/{number}", p.admin_round)
    r.add_get("/admin/v1/branches/{branch_id}/faults", p.admin_faults)
    r.add_put("/admin/v1/branches/{branch_id}/faults", p.admin_faults)
    r.add_get("/admin/v1/branches/{branch_id}/metrics", p.admin_metrics)
    r.add_get("/admin/v1/stats", p.admin_stats)
    r.add_delete("/admin/v1/stats", p.admin_stats)
    return app


ACCESS_LOGGER = _AccessLogger
