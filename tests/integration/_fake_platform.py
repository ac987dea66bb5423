"""A small real HTTP platform on loopback for client tests (PROTOCOL.md section 2).

It answers every leaf endpoint well enough to test the client against the contract,
records every request it sees (arrival time, headers, body), and injects faults per
route: an error status (with ``Retry-After``), a delay before answering, or a dropped
connection. Plus ``Socks5Proxy``, a tiny real SOCKS5 (no auth, CONNECT) relay.

Not the reference platform (``bk_sim.platform``): no rounds, no broker, no persistence.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import select
import socket
import socketserver
import ssl
import struct
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"^/api/v1/run/(?P<id>[^/]+)$"), "run"),
    ("POST", re.compile(r"^/api/v1/file/upload$"), "upload"),
    ("GET", re.compile(r"^/api/v1/file/download/(?P<id>[^/]+)$"), "download_url"),
    ("GET", re.compile(r"^/blob/(?P<id>[^/]+)$"), "download"),
    ("POST", re.compile(r"^/api/v1/performance/analysis$"), "metrics"),
    ("GET", re.compile(r"^/api/v1/config/branch/(?P<id>[^/]+)$"), "branch_config"),
    ("POST", re.compile(r"^/api/v1/ws/ticket$"), "ws_ticket"),
]


@dataclass(frozen=True)
class Fault:
    """What to do to one request instead of (or before) answering it."""

    status: int | None = None  # answer this status with {"error": error}
    error: str = "injected fault"
    retry_after: str | None = None
    delay: float = 0.0  # sleep this long first (client timeouts)
    drop: bool = False  # close the connection without any answer
    body: bytes | None = None  # raw body instead of the JSON error


@dataclass
class Seen:
    """One request as the server received it."""

    t: float
    method: str
    path: str
    endpoint: str | None
    headers: dict[str, str]
    body: bytes


@dataclass
class Upload:
    """An upload the platform accepted, parsed."""

    file_id: str
    filename: str | None
    file_bytes: bytes
    form: dict[str, Any]
    metadata: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakePlatform:
    """Start with ``with FakePlatform(creds) as p:``; ``p.url`` is its base URL."""

    credentials: dict[str, str]
    run_status: str = "start"
    run_number: int = 1
    absolute_download_urls: bool = False
    tls: tuple[str, str] | None = None  # (certfile, keyfile): serve https
    branch_config: dict[str, Any] = field(
        default_factory=lambda: {
            "branch": {"name": "b"},
            "service": {"aggregation": "fedavg"},
            "model_config": {"sklearn_params": {"C": 1.0}},
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
        }
    )
    files: dict[str, bytes] = field(default_factory=dict)
    uploads: list[Upload] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    tickets: list[dict[str, str]] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- control

    def inject(self, endpoint: str, fault: Fault, times: int = 1) -> None:
        """The next ``times`` requests to ``endpoint`` get ``fault``."""
        with self._lock:
            self._faults[endpoint].extend([fault] * times)

    def seen(self, endpoint: str) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> FakePlatform:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.platform = self  # type: ignore[attr-defined]
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            # Handshake in the handler thread, so a refused handshake can't stall accept().
            self._server.socket = ctx.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_all()
            self._server = None

    def __enter__(self) -> FakePlatform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- handling

    def _next_fault(self, endpoint: str | None) -> Fault | None:
        with self._lock:
            q = self._faults.get(endpoint or "")
            return q.popleft() if q else None

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def handle(self, endpoint: str, ident: str | None, h: _Handler, body: bytes) -> None:
        creds = self.credentials
        if endpoint != "download":  # the pre-signed URL needs no credentials
            bearer = f"Bearer {creds['id']}:{creds['session_token']}"
            if h.headers.get("Authorization") != bearer or h.headers.get("LEAF") != "true":
                return h.send_json(401, {"error": "bad or missing leaf credentials"})
        if endpoint in ("run", "branch_config") and ident != creds["branch_id"]:
            return h.send_json(403, {"error": "not your branch"})
        if endpoint == "run":
            return h.send_json(
                200, {"data": {"run_status": self.run_status, "run_number": self.run_number}}
            )
        if endpoint == "branch_config":
            return h.send_json(200, {"data": self.branch_config})
        if endpoint == "ws_ticket":
            ticket = {
                "ticket_id": uuid.uuid4().hex,
                "request_id": uuid.uuid4().hex,
                "expires_at": "2030-01-01T00:00:00Z",
            }
            with self._lock:
                self.tickets.append(ticket)
            return h.send_json(200, {"data": ticket})
        if endpoint == "metrics":
            try:
                doc = json.loads(body)
            except ValueError:
                return h.send_json(400, {"error": "body is not JSON"})
            with self._lock:
                self.metrics.append(doc)
            return h.send_json(201, {"data": {}})
        if endpoint == "upload":
            return self._upload(h, body)
        if endpoint == "download_url":
            if ident not in self.files:
                return h.send_json(404, {"error": f"no file {ident}"})
            url = f"/blob/{ident}?sig=s3cr3t"
            if self.absolute_download_urls:
                url = self.url + url
            return h.send_json(200, {"data": {"download_url": url}})
        if endpoint == "download":
            if ident not in self.files:
                return h.send_json(404, {"error": f"no blob {ident}"})
            return h.send_raw(200, self.files[ident or ""], "application/octet-stream")
        return h.send_json(404, {"error": "no such route"})

    def _upload(self, h: _Handler, body: bytes) -> None:
        try:
            parts = parse_multipart(h.headers.get("Content-Type", ""), body)
        except ValueError as exc:
            return h.send_json(400, {"error": f"bad multipart: {exc}"})
        if "file" not in parts or "data" not in parts:
            return h.send_json(400, {"error": f"need parts file and data, got {sorted(parts)}"})
        filename, data = parts["file"]
        digest = "sha256=" + base64.b64encode(hashlib.sha256(data).digest()).decode()
        if h.headers.get("x-bk-file-digest") != digest:
            return h.send_json(400, {"error": "x-bk-file-digest does not match the file"})
        if h.headers.get("x-bk-file-size") != str(len(data)):
            return h.send_json(400, {"error": "x-bk-file-size does not match the file"})
        form = json.loads(parts["data"][1])
        file_id = str(uuid.uuid4())
        upload = Upload(
            file_id=file_id,
            filename=filename,
            file_bytes=data,
            form=form,
            metadata=json.loads(form["metadata"]),
            headers=dict(h.headers.items()),
        )
        with self._lock:
            self.files[file_id] = data
            self.uploads.append(upload)
        return h.send_json(201, {"data": {"file_id": file_id}})


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """``{name: (filename, bytes)}`` of a multipart/form-data body, byte-exact."""
    m = re.match(r'multipart/form-data;\s*boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError(f"not multipart/form-data: {content_type!r}")
    delim = b"--" + m.group(1).encode()
    chunks = body.split(delim)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise ValueError("no closing boundary")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise ValueError("part not framed by CRLF")
        head, sep, content = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("part without headers")
        disp = next(
            (
                line.decode()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-disposition:")
            ),
            "",
        )
        name = re.search(r'\bname="([^"]*)"', disp)
        fname = re.search(r'\bfilename="([^"]*)"', disp)
        if not name:
            raise ValueError(f"part without a name: {disp!r}")
        parts[name.group(1)] = (fname.group(1) if fname else None, content)
    return parts


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_all(self) -> None:
        """Cut keep-alive connections too: a stopped platform answers nothing."""
        with self.sockets_lock:
            for sock in list(self.open_sockets):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: clients that time out leave broken pipes behind, on purpose."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Quiet."""

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        platform: FakePlatform = self.server.platform  # type: ignore[attr-defined]
        arrived = time.perf_counter()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?", 1)[0]
        endpoint, ident = None, None
        for route_method, pattern, name in ROUTES:
            m = pattern.match(path)
            if m and route_method == method:
                endpoint, ident = name, m.groupdict().get("id")
                break
        platform._record(
            Seen(arrived, method, self.path, endpoint, dict(self.headers.items()), body)
        )
        fault = platform._next_fault(endpoint)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            if fault.drop:
                self.close_connection = True
                return
            if fault.status is not None:
                extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                if fault.body is not None:
                    return self.send_raw(fault.status, fault.body, "text/plain", extra)
                return self.send_json(fault.status, {"error": fault.error}, extra)
        if endpoint is None:
            return self.send_json(404, {"error": f"no route for {method} {path}"})
        platform.handle(endpoint, ident, self, body)

    def send_json(self, status: int, doc: Any, extra: dict[str, str] | None = None) -> None:
        self.send_raw(status, json.dumps(doc).encode(), "application/json", extra)

    def send_raw(
        self, status: int, data: bytes, ctype: str, extra: dict[str, str] | None = None
    ) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


# --------------------------------------------------------------------------- SOCKS5


class Socks5Proxy:
    """A real SOCKS5 relay (RFC 1928, no auth, CONNECT only) that records its targets."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, int]] = []
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Socks5Proxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(5)
        ver, nmethods = _recv_exact(client, 2)
        _recv_exact(client, nmethods)
        if ver != 5:
            return
        client.sendall(b"\x05\x00")
        ver, cmd, _, atyp = _recv_exact(client, 4)
        if atyp == 1:
            host = socket.inet_ntoa(_recv_exact(client, 4))
        elif atyp == 3:
            host = _recv_exact(client, _recv_exact(client, 1)[0]).decode()
        else:
            client.sendall(b"\x05\x08\x00\x01" + b"\x00" * 6)
            return
        (port,) = struct.unpack("!H", _recv_exact(client, 2))
        if cmd != 1:
            client.sendall(b"\x05\x07\x00\x01" + b"\x00" * 6)
            return
        try:
            upstream = socket.create_connection((host, port), timeout=5)
        except OSError:
            client.sendall(b"\x05\x05\x00\x01" + b"\x00" * 6)
            return
        self.targets.append((host, port))
        client.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
        with upstream:
            _relay(client, upstream)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed during SOCKS handshake")
        buf += chunk
    return buf


def _relay(a: socket.socket, b: socket.socket) -> None:
    socks = [a, b]
    while True:
        readable, _, _ = select.select(socks, [], [], 5)
        if not readable:
            return
        for s in readable:
            data = s.recv(65536)
            if not data:
                return
            (b if s is a else a).sendall(data)


def _bench_upload(repeats: int = 9) -> None:
    """Median ``file_upload`` time of a 4 MB float32 layer, 'fast' compression, loopback.

    Twice: new bytes every time (each upload runs the client-side archive check) and the
    same file again (the client remembers that these bytes passed it).
    """
    import pathlib
    import statistics
    import tempfile

    import numpy as np

    from bk_sim import weights
    from bk_sim.client import Client

    creds = {k: f"bench-{k}" for k in ("id", "name", "session_token", "owner_id", "tree_id")}
    creds["branch_id"] = "bench-branch"
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("random", "trained-like"):
            arr = rng.standard_normal(1 << 20, dtype=np.float32)
            if kind == "trained-like":
                arr = np.round(arr, 2).astype(np.float32)
            fresh = [
                weights.save_weights(
                    pathlib.Path(tmp) / f"{kind}{i}", 100.0 + i, [arr], compression="fast"
                )
                for i in range(repeats + 1)
            ]
            path = fresh[0]
            with (
                FakePlatform(creds) as p,
                Client(creds, host=p.url, notifications=False, output_dir=tmp) as c,
            ):
                c.file_upload(path)  # warm the connection
                for label, paths in (("new bytes", fresh[1:]), ("same file", [path] * repeats)):
                    times = []
                    for each in paths:
                        t0 = time.perf_counter()
                        c.file_upload(each)
                        times.append(time.perf_counter() - t0)
                    p.uploads.clear()
                    print(  # noqa: T201 - a command-line benchmark
                        f"{kind}, {label}: {path.stat().st_size / 1e6:.2f} MB file, "
                        f"file_upload median {statistics.median(times) * 1e3:.1f} ms "
                        f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, n={repeats})"
                    )


def _bench_small_cpu(uploads: int = 2000) -> None:
    """CPU time of the uploading thread per 10 kB ``file_upload`` (the Locust user's cost)."""
    import pathlib
    import tempfile

    import numpy as np

    from bk_sim import weights
    from bk_sim.client import Client

    creds = {k: f"bench-{k}" for k in ("id", "name", "session_token", "owner_id", "tree_id")}
    creds["branch_id"] = "bench-branch"
    arr = np.random.default_rng(0).standard_normal(2560, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = weights.save_weights(pathlib.Path(tmp) / "w", 1.0, [arr], compression="fast")
        size = path.stat().st_size
        with (
            FakePlatform(creds) as p,
            Client(creds, host=p.url, notifications=False, output_dir=tmp) as c,
        ):
            for _ in range(50):
                c.file_upload(path)  # warm up
            per_upload = []
            for _ in range(5):
                p.uploads.clear()
                p.requests.clear()
                t0 = time.thread_time()
                for _ in range(uploads // 5):
                    c.file_upload(path)
                per_upload.append((time.thread_time() - t0) / (uploads // 5) * 1e3)
    print(  # noqa: T201 - a command-line benchmark
        f"10 kB ({size} B file), same file: uploading thread's CPU per "
        f"file_upload {sorted(per_upload)[2]:.2f} ms median of 5 x {uploads // 5}"
    )


if __name__ == "__main__":
    _bench_small_cpu()
    _bench_upload()
