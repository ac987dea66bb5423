"""Bad input never becomes a 500 or a poisoned round: each refusal has the right status
and a message naming the problem, and the round then aggregates exactly the good uploads."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import numpy as np
import pytest
import requests

from bk_sim.broker import ManagementAPI
from bk_sim.platform import PlatformHandle
from bk_sim.weights import encode_weights
from tests.conftest import PlatformFactory
from tests.integration._platform_support import (
    assert_layers,
    leaf_headers,
    make_branch,
    model,
    post_upload,
    reference,
)

pytestmark = pytest.mark.rabbitmq

MAX_UPLOAD = 64 * 1024
MAX_DECOMPRESSED = 256 * 1024


@pytest.fixture(scope="module")
def platform(management: ManagementAPI, platform_factory: PlatformFactory) -> PlatformHandle:
    return platform_factory(max_upload_bytes=MAX_UPLOAD, max_decompressed_bytes=MAX_DECOMPRESSED)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _bomb() -> bytes:
    """A small archive that inflates past the platform's decompression limit."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, arr in (
            ("weighting", np.array([1.0])),
            ("layer_0", np.zeros(MAX_DECOMPRESSED, np.uint8) + 1),
        ):
            inner = io.BytesIO()
            np.save(inner, arr)
            zf.writestr(f"{name}.npy", inner.getvalue())
    data = buf.getvalue()
    assert len(data) < MAX_UPLOAD
    return data


GOOD = [np.ones((3, 4), np.float32), np.ones(5, np.float32)]
BAD_ARCHIVES = {
    "not npz": (b"this is not a zip archive", "not an .npz"),
    "pickled": (
        _npz(weighting=np.array([1.0]), layer_0=np.array([{"x": 1}], dtype=object)),
        "without pickle",
    ),
    "truncated": (encode_weights(1.0, GOOD)[:-40], "archive"),
    "zip bomb": (_bomb(), "over the limit"),
    "nan": (encode_weights(1.0, [np.array([1.0, np.nan], np.float32)]), "NaN or infinite"),
    "inf": (encode_weights(1.0, [np.array([np.inf], np.float64)]), "NaN or infinite"),
    "zero weighting": (encode_weights(0.0, GOOD), "weighting must be finite and > 0"),
    "negative weighting": (encode_weights(-2.0, GOOD), "weighting must be finite and > 0"),
    "no weighting": (_npz(layer_0=np.ones(2)), "no 'weighting'"),
    "no layers": (_npz(weighting=np.array([1.0])), "no layer_"),
    "layer gap": (
        _npz(weighting=np.array([1.0]), layer_0=np.ones(1), layer_2=np.ones(1)),
        "missing layer_1",
    ),
}


def test_every_bad_upload_is_refused_with_its_reason_and_round_stays_clean(
    platform: PlatformHandle,
) -> None:
    rng = np.random.default_rng(3)
    with make_branch(platform, 2) as b:
        leaf = b.leaves[0]
        for label, (data, needle) in BAD_ARCHIVES.items():
            resp = post_upload(b.url, leaf, data)
            assert resp.status_code == 400, (label, resp.text)
            assert needle in resp.json()["error"], (label, resp.json())
        m0 = model(rng)
        b.upload_ok(0, 2.0, m0)
        # shape, dtype and layer-count disagreements with the round's first upload
        for layers, needle in (
            ([np.ones((4, 3), np.float32), np.ones(5, np.float32)], "layer_0 has shape (4, 3)"),
            ([np.ones((3, 4), np.float64), np.ones(5, np.float32)], "layer_0 has dtype"),
            ([np.ones((3, 4), np.float32)], "upload has 1 layers"),
        ):
            resp = b.upload(1, 1.0, layers)
            assert resp.status_code == 400, resp.text
            assert needle in resp.json()["error"]
        good = encode_weights(1.0, model(rng))
        for headers, status, needle in (
            ({"x-bk-file-digest": "sha256=" + "A" * 43 + "="}, 400, "does not match"),
            ({"x-bk-file-digest": "md5=abc"}, 400, "sha256="),
            ({"x-bk-file-size": str(len(good) + 1)}, 400, "x-bk-file-size says"),
            ({"x-bk-file-size": "many"}, 400, "must be an integer"),
            ({"x-bk-file-size": str(MAX_UPLOAD + 1)}, 413, "over the upload limit"),
        ):
            resp = post_upload(b.url, b.leaves[1], good, headers=headers)
            assert resp.status_code == status, (headers, resp.text)
            assert needle in resp.json()["error"]
        assert len(b.admin.round(b.branch_id, 1)["uploads"]) == 1
        m1 = model(rng)
        b.upload_ok(1, 1.0, m1)
        rec = b.wait(1)
        assert rec["status"] == "aggregated"
        assert_layers(
            b.download(1, rec["aggregation_id"]), reference("fedavg", [2.0, 1.0], [m0, m1])
        )
        stats = b.admin.stats()
        assert "500" not in stats.get("upload", {})


def test_oversized_bodies_are_refused_with_413(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        big = encode_weights(
            1.0, [np.random.default_rng(0).random(MAX_UPLOAD // 4)], compression="stored"
        )
        # no size header: the Content-Length gives it away
        hdr = {**leaf_headers(b.leaves[0]), "Content-Type": "multipart/form-data; boundary=x"}
        resp = requests.post(
            f"{b.url}/api/v1/file/upload",
            headers=hdr,
            data=b"x" * (MAX_UPLOAD + 128 * 1024),
            timeout=10,
        )
        assert resp.status_code == 413 and "over the upload limit" in resp.json()["error"]

        # a lying x-bk-file-size and chunked body: the part itself is cut off
        def chunks() -> Iterator[bytes]:
            yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="w"\r\n\r\n'
            yield big
            yield b"\r\n--x--\r\n"

        resp = requests.post(
            f"{b.url}/api/v1/file/upload",
            headers={**hdr, "x-bk-file-size": "10"},
            data=chunks(),
            timeout=10,
        )
        assert resp.status_code == 413 and "file part is over" in resp.json()["error"]

        # chunked, no Content-Length, and the bulk in a part the platform does not use:
        # it is counted too, not drained without limit
        def junk() -> Iterator[bytes]:
            yield b'--x\r\nContent-Disposition: form-data; name="junk"\r\n\r\n'
            for _ in range(4):
                yield bytes(MAX_UPLOAD)
            yield b"\r\n--x--\r\n"

        resp = requests.post(f"{b.url}/api/v1/file/upload", headers=hdr, data=junk(), timeout=10)
        assert resp.status_code == 413, resp.text
        assert "other than 'file' and 'data'" in resp.json()["error"]


def test_malformed_requests_are_400(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b:
        hdr = leaf_headers(b.leaves[0])
        url = f"{b.url}/api/v1/file/upload"
        resp = requests.post(url, headers=hdr, data=b"plain", timeout=5)
        assert resp.status_code == 400 and "multipart" in resp.json()["error"]
        resp = requests.post(url, headers=hdr, files={"other": ("w", b"x")}, timeout=5)
        assert resp.status_code == 400 and "'file' is missing" in resp.json()["error"]
        resp = requests.post(url, headers=hdr, files={"file": ("w", b"")}, timeout=5)
        assert resp.status_code == 400 and "empty" in resp.json()["error"]
        resp = requests.post(
            url,
            headers=hdr,
            timeout=5,
            files={"file": ("w", encode_weights(1.0, GOOD))},
            data={"data": "{not json"},
        )
        assert resp.status_code == 400 and "'data' is not valid JSON" in resp.json()["error"]
        resp = requests.post(
            f"{b.url}/api/v1/performance/analysis", headers=hdr, data=b"[", timeout=5
        )
        assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
        assert b.admin.rounds(b.branch_id) == []


def test_credentials_and_cross_branch_access(platform: PlatformHandle) -> None:
    with make_branch(platform, 1) as b, make_branch(platform, 1) as other:
        leaf = b.leaves[0]
        url = f"{b.url}/api/v1/run/{b.branch_id}"
        assert requests.get(url, timeout=5).status_code == 401
        for auth in (
            "Bearer",
            f"Bearer {leaf['id']}",
            f"Bearer {leaf['id']}:wrong",
            f"Basic {leaf['id']}:{leaf['session_token']}",
            f"Bearer {other.leaves[0]['id']}:{leaf['session_token']}",
        ):
            resp = requests.get(url, headers={"Authorization": auth}, timeout=5)
            assert resp.status_code == 401, auth
            assert "error" in resp.json()
        # another branch's run, config and files are not this leaf's
        hdr = leaf_headers(leaf)
        assert (
            requests.get(
                f"{b.url}/api/v1/run/{other.branch_id}", headers=hdr, timeout=5
            ).status_code
            == 404
        )
        assert (
            requests.get(
                f"{b.url}/api/v1/config/branch/{other.branch_id}", headers=hdr, timeout=5
            ).status_code
            == 404
        )
        foreign = other.upload_ok(0, 1.0, GOOD)
        resp = requests.get(f"{b.url}/api/v1/file/download/{foreign}", headers=hdr, timeout=5)
        assert resp.status_code == 404 and "no file" in resp.json()["error"]
        for unsafe in ("not-a-uuid", "..%2Fplatform.sqlite3", "%2e%2e"):
            resp = requests.get(f"{b.url}/api/v1/file/download/{unsafe}", headers=hdr, timeout=5)
            assert resp.status_code == 400, (unsafe, resp.text)
            assert "unsafe or malformed file id" in resp.json()["error"]
        # signed URLs: the other branch's own leaf gets one; forged or expired ones are 403
        resp = requests.get(
            f"{b.url}/api/v1/file/download/{foreign}",
            headers=leaf_headers(other.leaves[0]),
            timeout=5,
        )
        signed = resp.json()["data"]["download_url"]
        assert requests.get(signed, timeout=5).status_code == 200
        base, query = signed.split("?")
        expires = int(query.split("&")[0].split("=")[1])
        forged = f"{base}?expires={expires + 1000}&sig={query.split('sig=')[1]}"
        stale = f"{base}?expires=1000&sig={query.split('sig=')[1]}"
        for bad in (forged, stale, base, f"{base}?expires=x&sig=y"):
            resp = requests.get(bad, timeout=5)
            assert resp.status_code == 403 and "expired" in resp.json()["error"]
        admin_resp = requests.get(
            f"{b.url}/admin/v1/stats", timeout=5, headers={"Authorization": "Bearer nope"}
        )
        assert admin_resp.status_code == 401
