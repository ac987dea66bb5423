"""A hostile leaf and a careless operator against a real platform process (issue 16):
every request gets a 4xx with its reason or a 2xx, time and memory stay bounded, nothing
secret reaches the log."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import requests

from bk_sim.platform import Limits, PlatformHandle
from bk_sim.weights import digest_header, encode_weights
from tests.conftest import PlatformFactory
from tests.integration._fa_support import fa_archive
from tests.integration._platform_attacks import (
    RssSampler,
    address,
    bomb,
    raw_request,
    set_flag,
    set_method,
    status_of,
    wait_for_log,
)
from tests.integration._platform_support import leaf_headers, make_branch, post_upload

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.5
LIMITS = Limits(
    header_timeout_s=HEADER_TIMEOUT,
    body_timeout_s=BODY_TIMEOUT,
    keepalive_timeout_s=2.0,
    max_connections=64,
    max_inflight_bytes=600_000,
    inflight_wait_s=0.5,
    max_metrics_per_leaf=5,
    max_metrics_bytes_per_leaf=50_000,
    page_size=3,
    max_page_size=4,
)
MAX_DECOMPRESSED = 400 * 2**20


@pytest.fixture(scope="module")
def platform(platform_factory: PlatformFactory) -> PlatformHandle:
    return platform_factory(no_amqp=True, limits=LIMITS, max_decompressed_bytes=MAX_DECOMPRESSED)


def _no_500(platform: PlatformHandle) -> None:
    stats = platform.admin.stats()
    assert all("500" not in counts for counts in stats.values()), stats
    assert "unexpected error" not in platform.log_path.read_text(errors="replace")


# --------------------------------------------------------------------- 1. 4xx, never 500


@pytest.mark.parametrize(
    "credential",
    [b"\xff", b"\xc3\x28", b"\xe2\x82", b"tok\x80en", "tökén".encode(), b"\xf0\x9f\x98\x80"],
)
def test_a_non_utf8_or_non_ascii_authorization_header_is_401(
    platform: PlatformHandle, credential: bytes
) -> None:
    with make_branch(platform, 1) as b:
        leaf = b.leaves[0]
        for path, value in (
            (b"/admin/v1/stats", b"Bearer " + credential),
            (f"/api/v1/run/{b.branch_id}".encode(), f"Bearer {leaf['id']}:".encode() + credential),
            (f"/api/v1/run/{b.branch_id}".encode(), b"Bearer " + credential + b":token"),
        ):
            resp = raw_request(
                platform.url,
                b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: " + value + b"\r\n\r\n",
            )
            assert status_of(resp) == 401, resp[:300]
            assert b"Authorization" in resp or b"credentials" in resp
    _no_500(platform)


def _deep(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_json_nested_100000_deep_is_400_everywhere(platform: PlatformHandle, kind: str) -> None:
    deep = _deep(100_000, kind)
    with make_branch(platform, 1) as b:
        admin = {"Authorization": f"Bearer {platform.admin_token}"}
        for method, path, body in (
            ("POST", "/admin/v1/trees", deep),
            ("POST", "/admin/v1/branches", deep),
            ("PUT", f"/admin/v1/branches/{b.branch_id}/config", deep),
            ("PUT", f"/admin/v1/branches/{b.branch_id}/faults", deep),
            ("PUT", f"/admin/v1/branches/{b.branch_id}/config", '{"model_config": ' + deep + "}"),
        ):
            resp = requests.request(
                method, platform.url + path, data=deep if body is deep else body, headers=admin
            )
            assert resp.status_code == 400, (path, resp.text[:200])
            assert "nest" in resp.json()["error"]
        metrics = '{"mode": "test", "data": ' + deep + "}"
        resp = requests.post(
            f"{b.url}/api/v1/performance/analysis",
            headers=leaf_headers(b.leaves[0]),
            data=metrics,
            timeout=10,
        )
        assert resp.status_code == 400 and "nest" in resp.json()["error"], resp.text[:200]
        for depth, status, needle in ((5_000, 400, "nest"), (100_000, 413, "over 32 KiB")):
            resp = requests.post(
                f"{b.url}/api/v1/file/upload",
                headers=leaf_headers(b.leaves[0]),
                files={"file": ("w.npz", encode_weights(1.0, [np.ones(2)]))},
                data={"data": _deep(depth, kind)},
                timeout=10,
            )
            assert resp.status_code == status, resp.text[:200]
            assert needle in resp.json()["error"]
    _no_500(platform)


@pytest.mark.parametrize("charset", ["foo", "utf-16", "latin-1", "no-such-codec-\u00e9"])
def test_a_json_body_with_an_unknown_or_non_utf8_charset_is_415(
    platform: PlatformHandle, charset: str
) -> None:
    with make_branch(platform, 1) as b:
        ctype = f"application/json; charset={charset}".encode()
        body = b'{"name": "x"}'
        for path, auth in (
            (b"/admin/v1/trees", f"Bearer {platform.admin_token}".encode()),
            (
                b"/api/v1/performance/analysis",
                f"Bearer {b.leaves[0]['id']}:{b.leaves[0]['session_token']}".encode(),
            ),
        ):
            resp = raw_request(
                platform.url,
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: " + auth + b"\r\nContent-Type: " + ctype + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
            )
            assert status_of(resp) in (400, 415), resp[:300]
    _no_500(platform)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda d: set_flag(d, local=True, central=True), "encrypted"),
        (lambda d: set_flag(d, local=False, central=True), "encrypted"),
        (lambda d: set_flag(d, local=True, central=False), "encrypted"),
        (lambda d: set_method(d, 14), "compression method"),
    ],
)
@pytest.mark.parametrize("compression", ["faithful", "fast", "stored"])
def test_tampered_zip_members_are_400(
    platform: PlatformHandle, tamper: Any, needle: str, compression: Any
) -> None:
    with make_branch(platform, 2) as b:
        data = tamper(encode_weights(1.0, [np.ones(3)], compression=compression))
        resp = post_upload(b.url, b.leaves[0], data)
        assert resp.status_code == 400, resp.text
        assert needle in resp.json()["error"]
    _no_500(platform)


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda d: set_flag(d, local=True, central=True), "encrypted"),
        (lambda d: set_method(d, 14), "compression method"),
    ],
)
def test_tampered_analytics_archives_are_400(
    platform: PlatformHandle, tamper: Any, needle: str
) -> None:
    """The analytics path reads archives too: a tampered member is a 400 there as well."""
    with make_branch(platform, 2) as b:
        data = tamper(fa_archive({"age_n": np.array([3], dtype=np.int64)}))
        resp = post_upload(b.url, b.leaves[0], data)
        assert resp.status_code == 400, resp.text
        assert needle in resp.json()["error"] or "invalid_archive" in resp.json()["error"]
    _no_500(platform)


@pytest.mark.parametrize("sent_fraction", [0.0, 0.3, 0.99])
def test_a_client_hanging_up_mid_upload_is_no_error(
    platform: PlatformHandle, sent_fraction: float
) -> None:
    with make_branch(platform, 2) as b:
        platform.admin.reset_stats()
        leaf = b.leaves[0]
        payload = encode_weights(
            1.0, [np.random.default_rng(0).random(60_000)], compression="stored"
        )
        boundary = "hangup"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w"\r\n\r\n'
            ).encode()
            + payload
            + f"\r\n--{boundary}--\r\n".encode()
        )
        head = (
            f"POST /api/v1/file/upload HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {leaf['id']}:{leaf['session_token']}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        with socket.create_connection(address(platform.url)) as sock:
            sock.sendall(head + body[: int(len(body) * sent_fraction)])
            # wait until the platform reads the body, then hang up (RST)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        deadline = time.monotonic() + 10
        while platform.admin.stats().get("upload", {}).get("disconnected", 0) < 1:
            assert time.monotonic() < deadline, platform.admin.stats()
            time.sleep(0.05)
        assert platform.admin.rounds(b.branch_id) == []
        assert list((platform.data_dir / "files" / "incoming").glob("*.part")) == []
    _no_500(platform)


# --------------------------------------------------------------------- 2. memory


def test_concurrent_decompression_bombs_do_not_inflate_the_platform(
    platform: PlatformHandle,
) -> None:
    """Two bombs of 1/1000 inflate to 300 MB each; validation streams them."""
    assert platform.pid is not None
    valid = bomb(300 * 2**20)
    poisoned = bomb(300 * 2**20, nan_at_end=True)
    assert len(valid) < 500_000
    with make_branch(platform, 3) as b:
        with RssSampler(platform.pid) as rss, ThreadPoolExecutor(2) as pool:
            results = list(
                pool.map(
                    lambda i: post_upload(b.url, b.leaves[i], [valid, poisoned][i], timeout=60),
                    range(2),
                )
            )
        assert results[0].status_code == 201, results[0].text
        assert results[1].status_code == 400 and "NaN" in results[1].json()["error"]
        growth = rss.peak - rss.baseline
        assert growth < 100 * 2**20, f"platform RSS grew by {growth / 2**20:.0f} MiB"
    _no_500(platform)


def test_request_bodies_beyond_the_inflight_cap_get_503_with_retry_after(
    platform: PlatformHandle,
) -> None:
    with make_branch(platform, 2) as b:
        leaf = b.leaves[0]
        hold = (
            f"POST /api/v1/file/upload HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {leaf['id']}:{leaf['session_token']}\r\n"
            f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 500000\r\n\r\n"
        ).encode()
        with socket.create_connection(address(platform.url)) as sock:
            sock.sendall(hold + b"--x\r\n")  # 500 kB announced: holds most of the 600 kB cap
            data = encode_weights(1.0, [np.ones(60_000, np.float32)], compression="stored")
            resp = post_upload(b.url, b.leaves[1], data)
            assert resp.status_code == 503, resp.text
            assert resp.headers["Retry-After"].isdigit()
            assert "busy" in resp.json()["error"]
        # the stalled body is cut by the body timeout and its bytes released
        deadline = time.monotonic() + 10
        while (resp := post_upload(b.url, b.leaves[1], data)).status_code == 503:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert resp.status_code == 201, resp.text
    _no_500(platform)


# --------------------------------------------------------------------- 3. time


def _closed_within(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reads and discards any answer)."""
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - start


def test_slowloris_idle_and_stalled_connections_are_closed_by_their_timeouts(
    platform: PlatformHandle,
) -> None:
    host, port = address(platform.url)
    socks = {kind: [socket.create_connection((host, port)) for _ in range(3)] for kind in "ISB"}
    stop = threading.Event()

    def trickle() -> None:  # slowloris: a header byte every 0.2 s, never the end
        for s in socks["S"]:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.2):
            for s in socks["S"]:
                try:
                    s.sendall(b"X-a: b\r\n")
                except OSError:
                    pass

    for s in socks["B"]:  # a body announced larger than what is sent
        s.sendall(
            b"POST /admin/v1/trees HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + platform.admin_token.encode() + b"\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert requests.get(f"{platform.url}/healthz", timeout=2).status_code == 200
        slack = 1.5  # the watchdog's tick and this machine's load
        for kind, limit in (("I", HEADER_TIMEOUT), ("S", HEADER_TIMEOUT), ("B", BODY_TIMEOUT)):
            for s in socks[kind]:
                took = _closed_within(s, limit + slack)
                assert took < limit + slack, f"{kind}: still open after {took:.1f}s"
    finally:
        stop.set()
        thread.join()
        for group in socks.values():
            for s in group:
                s.close()


def test_at_the_connection_cap_waiting_connections_make_room(platform: PlatformHandle) -> None:
    host, port = address(platform.url)
    idle = [socket.create_connection((host, port)) for _ in range(LIMITS.max_connections + 8)]
    try:
        start = time.monotonic()
        resp = requests.get(f"{platform.url}/healthz", timeout=5)
        assert resp.status_code == 200 and time.monotonic() - start < 2
    finally:
        for s in idle:
            s.close()


def test_an_idle_keepalive_connection_is_closed(platform: PlatformHandle) -> None:
    with socket.create_connection(address(platform.url)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        took = _closed_within(sock, LIMITS.keepalive_timeout_s + 2)
        assert LIMITS.keepalive_timeout_s - 0.5 < took < LIMITS.keepalive_timeout_s + 2


# --------------------------------------------------------------------- 4. disk


def test_replaced_uploads_leave_one_file(platform: PlatformHandle) -> None:
    files = platform.data_dir / "files"
    with make_branch(platform, 2) as b:
        before = set(files.glob("*.npz"))
        rng = np.random.default_rng(1)
        ids = [b.upload_ok(0, 1.0, [rng.random(10)]) for _ in range(8)]
        kept = set(files.glob("*.npz")) - before
        assert kept == {files / f"{ids[-1]}.npz"}
        assert [u["file_id"] for u in b.admin.round(b.branch_id, 1)["uploads"]] == [ids[-1]]


def test_metrics_have_a_per_leaf_count_and_size_quota(platform: PlatformHandle) -> None:
    with make_branch(platform, 2) as b:
        url = f"{b.url}/api/v1/performance/analysis"

        def post(i: int, data: Any) -> requests.Response:
            body = {"mode": "test", "data": data}
            return requests.post(url, headers=leaf_headers(b.leaves[i]), json=body, timeout=5)

        resp = post(1, "x" * (LIMITS.max_metrics_bytes_per_leaf + 1))
        assert resp.status_code == 413 and "over the limit" in resp.json()["error"]
        for n in range(LIMITS.max_metrics_per_leaf):
            assert post(0, {"n": n}).status_code == 201
        resp = post(0, {"n": "one too many"})
        assert resp.status_code == 429 and "limit is 5" in resp.json()["error"]
        assert post(1, {"n": 0}).status_code == 201  # the quota is per leaf


def test_admin_listings_are_paginated(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        url = f"{b.url}/api/v1/performance/analysis"
        for n in range(5):
            body = {"mode": "train", "data": {"n": n}}
            requests.post(url, headers=leaf_headers(b.leaves[0]), json=body, timeout=5)
        for k in range(4):
            b.upload_ok(0, 1.0, [np.full(2, k + 1.0)])
            b.wait(k + 1)
        admin = {"Authorization": f"Bearer {platform.admin_token}"}
        page = requests.get(f"{b.url}/admin/v1/branches/{b.branch_id}/metrics", headers=admin)
        first = page.json()["data"]
        assert len(first["metrics"]) == LIMITS.page_size and first["next_after"] is not None
        rest = requests.get(
            f"{b.url}/admin/v1/branches/{b.branch_id}/metrics",
            headers=admin,
            params={"after": first["next_after"], "limit": 4},
        ).json()["data"]
        assert len(rest["metrics"]) == 2 and rest["next_after"] is None
        assert [json.loads(m["data"])["n"] for m in first["metrics"] + rest["metrics"]] == list(
            range(5)
        )
        rounds = requests.get(
            f"{b.url}/admin/v1/branches/{b.branch_id}/rounds", headers=admin
        ).json()["data"]
        assert [r["round"] for r in rounds["rounds"]] == [1, 2, 3] and rounds["next_after"] == 3
        for bad in ({"limit": 0}, {"limit": 5}, {"after": "x"}, {"after": -1}):
            resp = requests.get(
                f"{b.url}/admin/v1/branches/{b.branch_id}/rounds", headers=admin, params=bad
            )
            assert resp.status_code == 400, bad
        assert len(b.admin.rounds(b.branch_id)) == 4 and len(b.admin.metrics(b.branch_id)) == 5


# --------------------------------------------------------------------- 7. secrets


def test_no_secret_reaches_the_log_after_hostile_requests(platform: PlatformHandle) -> None:
    secrets = ["SIGSECRET0123", "TICKETSECRET456", "TOKENSECRET789", "HEADERSECRET000"]
    hostile = [
        # a request line aiohttp refuses while parsing, holding a signed URL
        b"GET /files/x?expires=1&sig=SIGSECRET0123 HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"G\x01T /files/x?expires=1&sig=SIGSECRET0123 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/ws?ticket=TICKETSECRET456&request_id=r HTTP/9.9\r\nHost: x\r\n\r\n",
        # an oversized header whose first bytes are a bearer token
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer TOKENSECRET789"
        + b"A" * 20_000
        + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Api-Key: HEADERSECRET000"
        + b"B" * 20_000
        + b"\r\n\r\n",
        # a bad header line holding a token
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization Bearer TOKENSECRET789\r\n\r\n",
    ]
    for data in hostile:
        resp = raw_request(platform.url, data)
        assert not resp or 400 <= status_of(resp) < 500, resp[:200]
    # an ordinary signed download and ticket, whose query must not be logged either
    with make_branch(platform, 1) as b:
        t = requests.post(
            f"{b.url}/api/v1/ws/ticket", headers=leaf_headers(b.leaves[0]), timeout=5
        ).json()["data"]
        requests.get(f"{b.url}/api/v1/ws", params={"ticket": t["ticket_id"], "request_id": "x"})
        secrets.append(t["ticket_id"])
        secrets.append(b.leaves[0]["session_token"])
    text = wait_for_log(platform.log_path, "refused a malformed request")
    # the oversized-header refusals are logged too (after the request-line ones)
    deadline = time.monotonic() + 5
    while text.count("refused a malformed request") < len(hostile) - 1:
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(0.05)
        text = platform.log_path.read_text(errors="replace")
    for secret in secrets:
        assert secret not in text, f"{secret} in the platform log"
    assert "sig=" not in text or "sig=<redacted>" in text


def test_digest_header_helper_is_what_the_platform_checks(platform: PlatformHandle) -> None:
    with make_branch(platform, 2) as b:
        data = encode_weights(1.0, [np.ones(4)])
        resp = post_upload(
            b.url, b.leaves[0], data, headers={"x-bk-file-digest": digest_header(data)}
        )
        assert resp.status_code == 201
