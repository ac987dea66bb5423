"""The client's HTTP half against a real loopback server speaking PROTOCOL.md section 2."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fake_platform import FakePlatform, Fault, Socks5Proxy

import bk_sim
from bk_sim.client import (
    Client,
    ConsumerSpec,
    RetryConfig,
    RunConfig,
    WebSocketConfig,
)
from bk_sim.errors import (
    AnalyticsError,
    ApiError,
    AuthError,
    ClientConfigError,
    ClientError,
    NotFoundError,
    RunBlockedError,
    TransportError,
    UnsafeFileIdError,
    WeightsFormatError,
)
from tests.support import Recorder

CREDS = {
    "id": "leaf-6f1c",
    "name": "leaf-one",
    "session_token": "tok-SECRET-9d2e",
    "owner_id": "owner-77",
    "tree_id": "tree-42",
    "branch_id": "branch-13",
}
FAST = RetryConfig(max_retries=3, backoff_factor=0.01, total_timeout=2)


@pytest.fixture()
def platform() -> Iterator[FakePlatform]:
    with FakePlatform(dict(CREDS)) as p:
        yield p


def make_client(platform: FakePlatform, tmp_path: Path, **kwargs: Any) -> tuple[Client, Recorder]:
    rec = Recorder()
    kwargs.setdefault("retry_config", FAST)
    kwargs.setdefault("notifications", False)
    client = Client(
        dict(CREDS),
        host=platform.url,
        output_dir=tmp_path / "out",
        observer=rec,
        **kwargs,
    )
    return client, rec


def weights_file(tmp_path: Path, name: str = "w", compression: str = "faithful") -> Path:
    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((8, 4)).astype(np.float32), np.arange(3.0)]
    return bk_sim.weights.save_weights(tmp_path / name, 12.0, layers, compression=compression)


def gaps(seen: list[Any]) -> list[float]:
    return [b.t - a.t for a, b in zip(seen, seen[1:], strict=False)]


# --------------------------------------------------------------------------- construction


def test_construction_reads_run_details_with_contract_headers(
    platform: FakePlatform, tmp_path: Path
) -> None:
    platform.run_number = 7
    client, rec = make_client(platform, tmp_path)
    with client:
        assert client.is_initialized
        assert (client.run_status, client.run_number) == ("start", 7)
        (req,) = platform.seen("run")
        assert req.path == "/api/v1/run/branch-13"
        assert req.headers["Authorization"] == "Bearer leaf-6f1c:tok-SECRET-9d2e"
        assert req.headers["accept"] == "application/json"
        assert req.headers["LEAF"] == "true"
        (ev,) = rec.of("http_request", "run")
        assert (ev.transport, ev.method, ev.status, ev.attempt) == ("http", "GET", 200, 1)
        assert ev.leaf_id == "leaf-6f1c" and ev.bytes_received and ev.duration_s is not None
        assert client.leaf_id == "leaf-6f1c" and client.branch_id == "branch-13"
        assert client.tree_id == "tree-42" and client.user_id == "owner-77"
        assert client.session_token == "tok-SECRET-9d2e"
    assert not client.is_initialized


def test_construction_fails_with_server_text_when_run_endpoint_refuses(
    platform: FakePlatform, tmp_path: Path
) -> None:
    platform.inject("run", Fault(status=403, error="leaf is suspended"))
    with pytest.raises(AuthError, match="leaf is suspended") as info:
        make_client(platform, tmp_path)
    assert info.value.status == 403
    assert len(platform.seen("run")) == 1


def test_construction_fails_after_retries_when_run_endpoint_errors(
    platform: FakePlatform, tmp_path: Path
) -> None:
    platform.inject("run", Fault(status=500, error="database down"), times=10)
    with pytest.raises(ApiError, match="database down") as info:
        make_client(platform, tmp_path, retry_config=RetryConfig(max_retries=2, backoff_factor=0))
    assert info.value.status == 500
    assert len(platform.seen("run")) == 3


def test_construction_fails_with_transport_error_when_nothing_listens(tmp_path: Path) -> None:
    with FakePlatform(dict(CREDS)) as p:
        url = p.url
    started = time.perf_counter()
    with pytest.raises(TransportError, match="no answer after 2 attempt"):
        Client(
            CREDS,
            host=url,
            notifications=False,
            retry_config=RetryConfig(max_retries=1, backoff_factor=0.01, total_timeout=1),
        )
    assert time.perf_counter() - started < 3


def test_construction_rejects_a_bad_run_status(platform: FakePlatform, tmp_path: Path) -> None:
    platform.run_status = "exploded"
    with pytest.raises(ApiError, match="run_status must be one of"):
        make_client(platform, tmp_path)


# --------------------------------------------------------------------------- upload


def test_upload_speaks_the_contract(platform: FakePlatform, tmp_path: Path) -> None:
    path = weights_file(tmp_path, "model_weights")
    data = path.read_bytes()
    client, rec = make_client(platform, tmp_path)
    with client:
        file_id = client.file_upload(
            path, training_stats={"loss": 0.5}, device_info={"cpu": 2}, custom={"k": "v"}
        )
    (up,) = platform.uploads
    assert file_id == up.file_id
    assert up.file_bytes == data
    assert up.filename == "model_weights.npz"
    assert up.form == {"leaf_name": "leaf-one", "metadata": up.form["metadata"]}
    assert isinstance(up.form["metadata"], str)  # a JSON string inside the JSON string
    meta = up.metadata
    digest = "sha256=" + base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert meta["client_version"] == bk_sim.__version__
    assert meta["file_size"] == len(data) and meta["file_digest"] == digest
    assert meta["training_stats"] == {"loss": 0.5} and meta["device_info"] == {"cpu": 2}
    assert meta["custom"] == {"k": "v"}
    assert meta["timestamp"].endswith("+00:00")
    assert meta["kind"] == "federated_learning"  # undeclared archive = learning
    (req,) = platform.seen("upload")
    assert req.headers["x-bk-file-size"] == str(len(data))
    assert req.headers["x-bk-file-digest"] == digest
    assert req.headers["Authorization"] == "Bearer leaf-6f1c:tok-SECRET-9d2e"
    assert req.headers["LEAF"] == "true" and req.headers["accept"] == "application/json"
    assert req.headers["Content-Type"].startswith("multipart/form-data; boundary=")
    (ev,) = rec.of("http_request", "upload")
    assert ev.status == 201 and ev.bytes_sent == len(req.body) > len(data)


def test_upload_without_optional_metadata_omits_them(
    platform: FakePlatform, tmp_path: Path
) -> None:
    client, _ = make_client(platform, tmp_path)
    with client:
        client.file_upload(weights_file(tmp_path), metadata={"round": 3, "file_size": -1})
    meta = platform.uploads[0].metadata
    assert meta["round"] == 3
    assert meta["file_size"] == len(platform.uploads[0].file_bytes)  # required keys win
    assert not {"device_info", "training_stats", "custom"} & set(meta)


def test_analytics_upload_declares_its_kind_in_archive_and_metadata(
    platform: FakePlatform, tmp_path: Path
) -> None:
    client, _ = make_client(platform, tmp_path)
    with client:
        path = client.save_analytics(
            {"age": [30, 40, 50]}, file_path=str(tmp_path / "stats"), nan_policy="raise"
        )
        assert path == str(tmp_path / "stats.npz")
        fields = client.save_fields(
            {"n_cases": 3, "spacing": np.array([1.0, 0.8])}, file_path=str(tmp_path / "f")
        )
        client.file_upload(path)
        client.file_upload(fields)
    first, second = platform.uploads
    assert first.metadata["kind"] == second.metadata["kind"] == "federated_analytics"
    with np.load(io.BytesIO(first.file_bytes), allow_pickle=False) as npz:
        assert str(npz["__bk_payload_kind__"]) == "federated_analytics"
        assert sorted(npz.files) == sorted(
            ["__bk_payload_kind__", "weighting"]
            + [f"age_{s}" for s in ("n", "sum", "sumsq", "min", "max", "nan")]
        )
        assert npz["weighting"].tolist() == [0.0]


def test_a_hand_built_analytics_archive_is_refused_before_any_request(
    platform: FakePlatform, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, __bk_payload_kind__=np.array("federated_analytics"), age_n=np.array(3))
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(AnalyticsError, match="'age_n' is 0-d"):
        client.file_upload(bad)
    assert platform.seen("upload") == []


def test_upload_refused_before_any_request_when_run_is_blocked(
    platform: FakePlatform, tmp_path: Path
) -> None:
    platform.run_status = "pause"
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(RunBlockedError, match="run is blocked"):
        client.file_upload(weights_file(tmp_path))
    assert platform.seen("upload") == []
    assert len(platform.seen("run")) == 1


def test_upload_refuses_a_broken_file_before_any_request(
    platform: FakePlatform, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    client, _ = make_client(platform, tmp_path)
    with client:
        with pytest.raises(WeightsFormatError, match="not an .npz"):
            client.file_upload(bad)
        with pytest.raises(WeightsFormatError, match="cannot read"):
            client.file_upload(tmp_path / "missing.npz")
    assert platform.seen("upload") == []


def test_a_file_changed_after_an_upload_is_checked_again(
    platform: FakePlatform, tmp_path: Path
) -> None:
    path = weights_file(tmp_path)
    client, _ = make_client(platform, tmp_path)
    with client:
        client.file_upload(path)
        client.file_upload(path)  # same bytes: remembered verdict
        path.write_bytes(b"PK\x03\x04 truncated")
        with pytest.raises(WeightsFormatError):
            client.file_upload(path)
        weights_file(tmp_path, "w", compression="fast")  # new valid bytes, same path
        client.file_upload(path)
    assert len(platform.seen("upload")) == 3
    assert platform.uploads[2].file_bytes == path.read_bytes() != platform.uploads[0].file_bytes


def test_wait_for_run_waits_until_the_run_starts(platform: FakePlatform, tmp_path: Path) -> None:
    platform.run_status = "stop"
    client, rec = make_client(
        platform, tmp_path, run_config=RunConfig(wait_for_run=True, check_interval_s=0.1)
    )
    flip = threading.Timer(0.45, lambda: setattr(platform, "run_status", "start"))
    flip.start()
    try:
        with client:
            started = time.perf_counter()
            file_id = client.file_upload(weights_file(tmp_path))
            waited = time.perf_counter() - started
    finally:
        flip.cancel()
    assert file_id == platform.uploads[0].file_id
    assert 0.4 < waited < 2.0
    waits = rec.of("run_wait")
    assert len(waits) >= 3 and waits[0].value == "stop" and waits[0].delay_s == 0.1
    assert len(platform.seen("run")) >= 4  # construction + one check per interval
    assert platform.seen("upload")[0].t > platform.seen("run")[-1].t


def test_wait_for_run_never_waits_for_a_broken_file(platform: FakePlatform, tmp_path: Path) -> None:
    platform.run_status = "pause"
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK but not really")
    client, rec = make_client(platform, tmp_path, wait_for_run=True, run_check_interval_s=30)
    with client, pytest.raises(WeightsFormatError):
        client.file_upload(bad)
    assert rec.of("run_wait") == []


def test_wait_for_run_ends_when_the_client_closes(platform: FakePlatform, tmp_path: Path) -> None:
    platform.run_status = "pause"
    client, _ = make_client(platform, tmp_path, wait_for_run=True, run_check_interval_s=30)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            client.file_upload(weights_file(tmp_path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(0.2)
    started = time.perf_counter()
    client.close()
    t.join(5)
    assert not t.is_alive() and time.perf_counter() - started < 1
    assert isinstance(errors[0], RunBlockedError)


# --------------------------------------------------------------------------- retries


def test_retry_waits_follow_the_documented_schedule(platform: FakePlatform, tmp_path: Path) -> None:
    factor = 0.1
    client, rec = make_client(
        platform, tmp_path, retry_config=RetryConfig(max_retries=3, backoff_factor=factor)
    )
    platform.inject("branch_config", Fault(status=503), times=3)
    with client:
        assert client.get_branch_config()["model_config"] == {"sklearn_params": {"C": 1.0}}
    seen = platform.seen("branch_config")
    assert len(seen) == 4
    expected = [factor * 2 ** (n - 1) for n in (1, 2, 3)]  # 0.1, 0.2, 0.4 (not urllib3's 0)
    for gap, want in zip(gaps(seen), expected, strict=True):
        assert want - 0.01 <= gap <= want + 0.15, (gaps(seen), expected)
    waits = rec.of("retry_wait", "branch_config")
    assert [w.delay_s for w in waits] == pytest.approx(expected)
    assert [w.attempt for w in waits] == [1, 2, 3] and {w.status for w in waits} == {503}
    assert [e.attempt for e in rec.of("http_request", "branch_config")] == [1, 2, 3, 4]
    assert [e.status for e in rec.of("http_request", "branch_config")] == [503, 503, 503, 200]


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_exhaust_retries_then_raise_api_error(
    platform: FakePlatform, tmp_path: Path, status: int
) -> None:
    client, _ = make_client(
        platform, tmp_path, retry_config=RetryConfig(max_retries=2, backoff_factor=0.001)
    )
    platform.inject("branch_config", Fault(status=status, error=f"busy {status}"), times=5)
    with client, pytest.raises(ApiError, match=f"busy {status}") as info:
        client.get_branch_config()
    assert info.value.status == status and info.value.message == f"busy {status}"
    assert len(platform.seen("branch_config")) == 3


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, ApiError), (401, AuthError), (403, AuthError), (404, NotFoundError), (409, ApiError)],
)
def test_other_4xx_are_tried_once(
    platform: FakePlatform, tmp_path: Path, status: int, error_type: type[ApiError]
) -> None:
    client, rec = make_client(platform, tmp_path)
    platform.inject("upload", Fault(status=status, error="layer_1 has the wrong shape"))
    with client, pytest.raises(error_type, match="layer_1 has the wrong shape") as info:
        client.file_upload(weights_file(tmp_path))
    assert type(info.value) is error_type and info.value.status == status
    assert len(platform.seen("upload")) == 1 and rec.of("retry_wait") == []


def test_non_json_error_body_is_previewed(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(platform, tmp_path)
    platform.inject("branch_config", Fault(status=400, body=b"<html>Bad Gateway Page</html>"))
    with client, pytest.raises(ApiError, match="<html>Bad Gateway Page</html>"):
        client.get_branch_config()


def test_retry_after_seconds_is_honoured(platform: FakePlatform, tmp_path: Path) -> None:
    client, rec = make_client(
        platform, tmp_path, retry_config=RetryConfig(max_retries=2, backoff_factor=0.01)
    )
    platform.inject("metrics", Fault(status=429, retry_after="0.4"))
    platform.inject("metrics", Fault(status=500, retry_after="5"))  # ignored: not 429/503
    with client:
        assert client.send_performance_metrics("agg-1", {"acc": 0.9}) is True
    g = gaps(platform.seen("metrics"))
    assert 0.39 <= g[0] <= 0.6 and g[1] < 0.3
    assert [w.delay_s for w in rec.of("retry_wait")] == pytest.approx([0.4, 0.02])


def test_retry_after_http_date_is_honoured(platform: FakePlatform, tmp_path: Path) -> None:
    client, rec = make_client(platform, tmp_path)
    when = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1-2 s away
    platform.inject("branch_config", Fault(status=503, retry_after=when))
    with client:
        client.get_branch_config()
    (wait,) = rec.of("retry_wait")
    assert wait.delay_s is not None and 0.9 <= wait.delay_s <= 2.0
    assert gaps(platform.seen("branch_config"))[0] >= 0.9


def test_dropped_connection_is_retried(platform: FakePlatform, tmp_path: Path) -> None:
    client, rec = make_client(platform, tmp_path)
    platform.inject("upload", Fault(drop=True), times=2)
    with client:
        file_id = client.file_upload(weights_file(tmp_path))
    assert file_id == platform.uploads[0].file_id and len(platform.seen("upload")) == 3
    failed = [e for e in rec.of("http_request", "upload") if e.error]
    assert len(failed) == 2 and all(e.status is None for e in failed)
    assert all(w.error for w in rec.of("retry_wait", "upload"))


def test_dropped_connections_end_in_transport_error(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(
        platform, tmp_path, retry_config=RetryConfig(max_retries=2, backoff_factor=0.01)
    )
    platform.inject("upload", Fault(drop=True), times=5)
    with client, pytest.raises(TransportError, match="no answer after 3 attempt") as info:
        client.file_upload(weights_file(tmp_path))
    assert "requests" not in type(info.value).__module__
    assert len(platform.seen("upload")) == 3


def test_timeout_is_retried(platform: FakePlatform, tmp_path: Path) -> None:
    client, rec = make_client(
        platform,
        tmp_path,
        retry_config=RetryConfig(max_retries=2, backoff_factor=0.01, total_timeout=0.3),
    )
    platform.inject("branch_config", Fault(delay=0.8))
    with client:
        started = time.perf_counter()
        client.get_branch_config()
        took = time.perf_counter() - started
    first, second = rec.of("http_request", "branch_config")
    assert first.status is None and "Timeout" in (first.error or "")
    assert 0.25 <= (first.duration_s or 0) < 0.7 and second.status == 200
    assert took < 0.8


def test_timeouts_end_in_transport_error(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(
        platform,
        tmp_path,
        retry_config=RetryConfig(max_retries=1, backoff_factor=0.01, total_timeout=0.2),
    )
    platform.inject("branch_config", Fault(delay=0.5), times=2)
    with client, pytest.raises(TransportError, match="Timeout"):
        client.get_branch_config()


def test_methods_outside_allowed_methods_are_not_retried(
    platform: FakePlatform, tmp_path: Path
) -> None:
    client, _ = make_client(
        platform, tmp_path, retry_config=RetryConfig(backoff_factor=0, allowed_methods=("GET",))
    )
    platform.inject("upload", Fault(status=503, error="overloaded"), times=3)
    with client, pytest.raises(ApiError, match="overloaded"):
        client.file_upload(weights_file(tmp_path))
    assert len(platform.seen("upload")) == 1


def test_close_interrupts_a_retry_wait(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(
        platform, tmp_path, retry_config=RetryConfig(max_retries=3, backoff_factor=30)
    )
    platform.inject("branch_config", Fault(status=503), times=5)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.get_branch_config()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.3)
    started = time.perf_counter()
    client.close()
    t.join(5)
    assert not t.is_alive() and time.perf_counter() - started < 1
    assert isinstance(errors[0], ApiError) and errors[0].status == 503
    assert len(platform.seen("branch_config")) == 1  # no attempt after close


# --------------------------------------------------------------------------- download


@pytest.mark.parametrize("absolute", [False, True])
def test_download_is_two_steps_and_lands_the_exact_bytes(
    platform: FakePlatform, tmp_path: Path, absolute: bool
) -> None:
    platform.absolute_download_urls = absolute
    payload = bk_sim.weights.encode_layers([np.ones((5, 5), np.float32)])
    platform.files["agg-123"] = payload
    client, rec = make_client(platform, tmp_path)
    with client:
        downloaded = client.file_download("agg-123")
    assert isinstance(downloaded, str)  # the published client returns a str
    path = Path(downloaded)
    assert path == tmp_path / "out" / "agg-123.npz"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["agg-123.npz"]  # no temp left
    (ask,) = platform.seen("download_url")
    assert ask.headers["accept"] == "*/*" and ask.headers["LEAF"] == "true"
    assert ask.headers["Authorization"].startswith("Bearer leaf-6f1c:")
    (blob,) = platform.seen("download")
    assert blob.path == "/blob/agg-123?sig=s3cr3t"
    assert "Authorization" not in blob.headers and "LEAF" not in blob.headers
    assert [e.endpoint for e in rec.of("http_request")] == ["run", "download_url", "download"]
    assert rec.of("http_request", "download")[0].bytes_received == len(payload)


def test_download_of_an_empty_body_is_an_error(platform: FakePlatform, tmp_path: Path) -> None:
    platform.files["agg-empty"] = b""
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(ApiError, match="empty body"):
        client.file_download("agg-empty")
    assert not (tmp_path / "out" / "agg-empty.npz").exists()


def test_a_download_url_urllib_cannot_parse_is_an_api_error(
    platform: FakePlatform, tmp_path: Path
) -> None:
    doc = {"data": {"download_url": "http://[::1/blob/agg-1?sig=SECRET"}}
    platform.inject("download_url", Fault(status=200, body=json.dumps(doc).encode()))
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(ApiError, match="download_url is not a valid URL") as info:
        client.file_download("agg-1")
    assert "SECRET" not in str(info.value) and platform.seen("download") == []


def test_download_of_an_unknown_id_is_not_found(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(NotFoundError, match="no file nope"):
        client.file_download("nope")


@pytest.mark.parametrize("file_id", ["../x", "a/b", "", "/etc/passwd", "..", "a\\b", ".hidden"])
def test_unsafe_file_ids_are_refused_before_any_request(
    platform: FakePlatform, tmp_path: Path, file_id: str
) -> None:
    client, _ = make_client(platform, tmp_path)
    with client, pytest.raises(UnsafeFileIdError):
        client.file_download(file_id)
    assert platform.seen("download_url") == [] and platform.seen("download") == []


def test_download_retries_the_blob_get(platform: FakePlatform, tmp_path: Path) -> None:
    platform.files["agg-9"] = b"PK-bytes"
    platform.inject("download", Fault(status=502), times=2)
    client, _ = make_client(platform, tmp_path)
    with client:
        assert Path(client.file_download("agg-9")).read_bytes() == b"PK-bytes"
    assert len(platform.seen("download_url")) == 1 and len(platform.seen("download")) == 3


# --------------------------------------------------------------------------- other calls


def test_metrics_body_and_result(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(platform, tmp_path, retry_config=RetryConfig(max_retries=0))
    with client:
        assert client.send_performance_metrics("agg-1", json.dumps({"acc": 0.9})) is True
        assert client.send_performance_metrics("agg-2", {"loss": 1}, mode="train") is True
        platform.inject("metrics", Fault(status=500))
        assert client.send_performance_metrics("agg-3", "{}") is False
        assert client.send_performance_metrics("agg-4", "{}", mode="bogus") is False
        assert client.send_performance_metrics("agg-5", {"x": object()}) is False
    first, second = platform.metrics
    assert first == {
        "mode": "test",
        "aggregation_id": "agg-1",
        "leaf_id": "leaf-6f1c",
        "branch_id": "branch-13",
        "tree_id": "tree-42",
        "data": '{"acc": 0.9}',
    }
    assert second["mode"] == "train" and json.loads(second["data"]) == {"loss": 1}
    assert len(platform.seen("metrics")) == 3


def test_metrics_never_raise_without_a_server(tmp_path: Path) -> None:
    with FakePlatform(dict(CREDS)) as p:
        client, _ = make_client(p, tmp_path, retry_config=RetryConfig(max_retries=0))
    with client:
        assert client.send_performance_metrics("agg-1", "{}") is False
    assert client.send_performance_metrics("agg-1", "{}") is False  # closed: still no raise


def test_branch_config_and_ws_ticket(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(platform, tmp_path)
    with client:
        cfg = client.get_branch_config()
        ticket = client.get_ws_ticket()
    assert set(cfg) == {"branch", "service", "model_config", "created_at", "updated_at"}
    assert set(ticket) == {"ticket_id", "request_id", "expires_at"}
    (req,) = platform.seen("branch_config")
    assert req.path == "/api/v1/config/branch/branch-13"


def test_the_token_never_reaches_events(platform: FakePlatform, tmp_path: Path) -> None:
    client, rec = make_client(platform, tmp_path)
    platform.inject("upload", Fault(status=401, error="bad bearer"))
    with client:
        with pytest.raises(AuthError) as info:
            client.file_upload(weights_file(tmp_path))
        client.get_branch_config()
    assert "tok-SECRET" not in str(info.value) and "tok-SECRET" not in repr(client)
    assert rec.events and all("tok-SECRET" not in repr(e.to_dict()) for e in rec.events)


# --------------------------------------------------------------------------- notifications


def test_notifications_fill_the_queue_and_follow_the_run(
    platform: FakePlatform, tmp_path: Path
) -> None:
    client, rec = make_client(platform, tmp_path)
    with client:
        assert client.get_latest_aggregation_id() is None
        client._on_notification(
            {"message_type": "aggregation_status", "body": {"aggregation_id": "a1"}}
        )
        client._on_notification(
            {"message_type": "aggregation_status", "body": {"aggregation_id": "a2"}}
        )
        assert client.queue.qsize() == 1 and client.get_latest_aggregation_id() == "a2"
        client._on_notification({"message_type": "run_status", "body": {"run_status": "pause"}})
        assert client.run_status == "pause" and len(platform.seen("run")) == 1
        platform.run_number = 2
        client._on_notification({"message_type": "run_status", "body": {"run_status": "start"}})
        assert client.run_status == "start"
        assert client._refreshed.wait(5)
        assert client.run_number == 2 and len(platform.seen("run")) == 2
        for junk in (
            None,
            "x",
            {},
            {"message_type": "aggregation_status", "body": {}},
            {"message_type": "run_status", "body": {"run_status": "dance"}},
            {"message_type": "nope", "body": {}},
        ):
            client._on_notification(junk)  # type: ignore[arg-type]
        assert client.run_status == "start" and client.queue.empty()
    notes = [(e.message_type, e.value) for e in rec.of("notification")]
    assert notes == [
        ("aggregation_status", "a1"),
        ("aggregation_status", "a2"),
        ("run_status", "pause"),
        ("run_status", "start"),
    ]


def test_the_run_refresh_is_off_the_consumer_thread_and_never_undoes_a_newer_status(
    platform: FakePlatform, tmp_path: Path
) -> None:
    client, _ = make_client(platform, tmp_path)
    with client:
        platform.run_number = 3
        platform.inject("run", Fault(delay=0.5))  # the refresh answer comes late
        started = time.perf_counter()
        client._on_notification({"message_type": "run_status", "body": {"run_status": "start"}})
        assert time.perf_counter() - started < 0.2  # the consumer is not held up
        time.sleep(0.1)
        client._on_notification({"message_type": "run_status", "body": {"run_status": "pause"}})
        assert client._refreshed.wait(5)
        # The answer said "start" but was asked before the pause arrived: pause stands.
        assert (client.run_status, client.run_number) == ("pause", 3)


def test_a_start_notification_wakes_a_waiting_upload(
    platform: FakePlatform, tmp_path: Path
) -> None:
    platform.run_status = "pause"
    client, _ = make_client(platform, tmp_path, wait_for_run=True, run_check_interval_s=30)
    done = threading.Event()

    def upload() -> None:
        client.file_upload(weights_file(tmp_path))
        done.set()

    with client:
        t = threading.Thread(target=upload)
        t.start()
        time.sleep(0.2)
        platform.run_status = "start"
        client._on_notification({"message_type": "run_status", "body": {"run_status": "start"}})
        assert done.wait(3)
        t.join(3)
    assert len(platform.uploads) == 1


def test_default_amqp_consumer_never_blocks_construction(
    platform: FakePlatform, tmp_path: Path
) -> None:
    pytest.importorskip("bk_sim.client._amqp", reason="AMQP consumer not written yet")
    with FakePlatform(dict(CREDS)) as dead:  # a port where nothing will listen
        dead_port = dead.port
    started = time.perf_counter()
    client = Client(
        CREDS,
        host=platform.url,
        rbmq_host="127.0.0.1",
        rbmq_port=dead_port,
        rbmq_ssl=False,
        output_dir=tmp_path,
    )
    built = time.perf_counter() - started
    assert client.is_initialized and not client.notifications_connected
    started = time.perf_counter()
    client.close()
    assert built < 2 and time.perf_counter() - started < 6


def test_websocket_transport_fetches_a_ticket_and_connects_to_the_api_host(
    platform: FakePlatform, tmp_path: Path
) -> None:
    """Wiring only: this server speaks no WebSocket, so the consumer keeps retrying."""
    pytest.importorskip("bk_sim.client._websocket", reason="WebSocket consumer not written yet")
    started = time.perf_counter()
    client, _ = make_client(
        platform,
        tmp_path,
        use_websocket=True,
        notifications=True,
        websocket_config=WebSocketConfig(reconnect_backoff_factor=1.1, open_timeout=2),
    )
    assert time.perf_counter() - started < 2
    with client:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
            r.path.startswith("/api/v1/ws?") for r in platform.requests
        ):
            time.sleep(0.05)
        (ticket_req, *_) = platform.seen("ws_ticket")
        assert ticket_req.headers["Authorization"] == "Bearer leaf-6f1c:tok-SECRET-9d2e"
        ticket = platform.tickets[0]
        upgrade = next(r for r in platform.requests if r.path.startswith("/api/v1/ws?"))
        assert upgrade.path == (
            f"/api/v1/ws?ticket={ticket['ticket_id']}&request_id={ticket['request_id']}"
        )
        assert not client.notifications_connected
        started = time.perf_counter()
    assert time.perf_counter() - started < 6


# --------------------------------------------------------------------------- proxies, close


def test_requests_go_through_a_socks5_proxy(platform: FakePlatform, tmp_path: Path) -> None:
    with Socks5Proxy() as proxy:
        client, _ = make_client(platform, tmp_path, proxies={"http": proxy.url})
        with client:
            client.file_upload(weights_file(tmp_path))
        assert ("127.0.0.1", platform.port) in proxy.targets
    assert len(platform.uploads) == 1


def test_a_proxy_set_in_the_environment_mid_run_takes_effect_at_once(
    platform: FakePlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    with Socks5Proxy() as proxy:
        client, _ = make_client(platform, tmp_path)
        with client:
            client.get_branch_config()
            assert proxy.targets == []
            monkeypatch.setenv("HTTP_PROXY", proxy.url)  # requests reads it per request
            client.get_branch_config()
            assert proxy.targets == [("127.0.0.1", platform.port)]
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            client.get_branch_config()
            monkeypatch.delenv("NO_PROXY")
            monkeypatch.delenv("HTTP_PROXY")
            client.get_branch_config()
        assert len(proxy.targets) == 1
    assert len(platform.seen("branch_config")) == 4


def test_a_dead_socks5_proxy_is_a_transport_error(platform: FakePlatform, tmp_path: Path) -> None:
    with Socks5Proxy() as proxy:
        url = proxy.url
    with pytest.raises(TransportError):
        make_client(
            platform,
            tmp_path,
            proxies={"http": url},
            retry_config=RetryConfig(max_retries=1, backoff_factor=0.01, total_timeout=1),
        )
    assert platform.seen("run") == []


def test_close_is_prompt_idempotent_and_final(platform: FakePlatform, tmp_path: Path) -> None:
    client, _ = make_client(platform, tmp_path)
    started = time.perf_counter()
    client.close()
    client.close()
    assert time.perf_counter() - started < 0.5 and not client.is_initialized
    with pytest.raises(ClientError, match="closed"):
        client.file_upload(weights_file(tmp_path))
    with pytest.raises(ClientError, match="closed"):
        client.file_download("agg-1")
    with pytest.raises(ClientError, match="closed"):
        client.get_branch_config()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl CLI)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = str(folder / "cert.pem"), str(folder / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_a_self_signed_platform_is_refused_by_default(
    self_signed: tuple[str, str], tmp_path: Path
) -> None:
    with FakePlatform(dict(CREDS), tls=self_signed) as p:
        with pytest.raises(TransportError, match="SSLError") as info:
            Client(CREDS, host=p.url, notifications=False, retry_config=FAST)
        assert "1 attempt" in str(info.value)  # a certificate problem is not retried
        assert p.requests == []


def test_ssl_false_talks_to_a_self_signed_platform(
    self_signed: tuple[str, str], tmp_path: Path
) -> None:
    with FakePlatform(dict(CREDS), tls=self_signed) as p:
        client, _ = make_client(p, tmp_path, ssl=False)
        with client:
            file_id = client.file_upload(weights_file(tmp_path))
        assert p.url.startswith("https://") and p.uploads[0].file_id == file_id


def test_trusting_the_certificate_works_and_disabling_verification_keeps_working(
    self_signed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", self_signed[0])  # requests' own trust setting
    with FakePlatform(dict(CREDS), tls=self_signed) as p:
        client, _ = make_client(p, tmp_path)
        with client:
            client.get_branch_config()
            monkeypatch.delenv("REQUESTS_CA_BUNDLE")
            assert client.disable_ssl_verification() is False
            client.get_branch_config()
        assert len(p.seen("branch_config")) == 2


def test_a_ca_bundle_removed_from_the_environment_mid_run_is_no_longer_trusted(
    self_signed: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", self_signed[0])
    with FakePlatform(dict(CREDS), tls=self_signed) as p:
        client, _ = make_client(p, tmp_path)
        with client:
            client.get_branch_config()
            monkeypatch.delenv("REQUESTS_CA_BUNDLE")
            with pytest.raises(TransportError, match="SSLError"):
                client.get_branch_config()
        assert len(p.seen("branch_config")) == 1


# --------------------------------------------------------------------------- real AMQP wiring


@pytest.mark.rabbitmq
def test_client_follows_real_amqp_notifications(
    management: Any, unique: str, tmp_path: Path
) -> None:
    pytest.importorskip("bk_sim.client._amqp", reason="AMQP consumer not written yet")
    import pika

    creds = {
        "id": f"client-leaf-{unique}",
        "name": "client test leaf",
        "session_token": f"token-{unique}",
        "owner_id": f"owner-{unique}",
        "tree_id": f"client-tree-{unique}",
        "branch_id": f"client-branch-{unique}",
    }
    vhost, leaf, exchange = creds["tree_id"], creds["id"], creds["branch_id"]
    management.create_vhost(vhost)
    try:
        management.set_permissions(vhost, "guest", ".*", ".*", ".*")
        management.create_user(leaf, creds["session_token"])
        management.set_permissions(vhost, leaf, configure="", write="", read=f"^{leaf}$")
        management.declare_exchange(vhost, exchange, "fanout")
        management.declare_queue(vhost, leaf)
        management.bind(vhost, exchange, leaf)
        with FakePlatform(dict(creds)) as p:
            rec = Recorder()
            client = Client(
                creds,
                host=p.url,
                rbmq_host="127.0.0.1",
                rbmq_port=5672,
                rbmq_ssl=False,
                output_dir=tmp_path,
                observer=rec,
                retry_config=FAST,
            )
            with client:
                deadline = time.monotonic() + 10
                while not client.notifications_connected and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.notifications_connected
                p.run_number = 5
                conn = pika.BlockingConnection(
                    pika.ConnectionParameters(
                        "127.0.0.1", 5672, vhost, pika.PlainCredentials("guest", "guest")
                    )
                )
                try:
                    ch = conn.channel()
                    ch.confirm_delivery()
                    for msg in (
                        {"message_type": "run_status", "body": {"run_status": "pause"}},
                        {"message_type": "aggregation_status", "body": {"aggregation_id": "g1"}},
                        {"message_type": "run_status", "body": {"run_status": "start"}},
                    ):
                        ch.basic_publish(
                            exchange,
                            "",
                            json.dumps(msg).encode(),
                            pika.BasicProperties(delivery_mode=2),
                        )
                finally:
                    conn.close()
                assert client.queue.get(timeout=10) == "g1"
                deadline = time.monotonic() + 10
                while len(rec.of("notification")) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert [e.value for e in rec.of("notification")] == ["pause", "g1", "start"]
                assert client._refreshed.wait(10)
                assert (client.run_status, client.run_number) == ("start", 5)
    finally:
        management.delete_vhost(vhost)
        management.delete_user(leaf)


# --------------------------------------------------------------------------- drop-in API


def test_published_positional_construction_and_properties(
    platform: FakePlatform, tmp_path: Path
) -> None:
    from bk_sim.client import APIConfig, Credentials

    c = CREDS
    creds = Credentials(
        c["id"], c["name"], c["session_token"], c["tree_id"], c["branch_id"], c["owner_id"]
    )
    out = str(tmp_path / "agg")
    api = APIConfig(platform.url)
    with Client(creds, api, None, None, None, FAST, False, out, notifications=False) as client:
        assert client.output_dir == out and client.use_websocket is False
        assert (client.tree_id, client.branch_id, client.user_id) == (
            c["tree_id"],
            c["branch_id"],
            c["owner_id"],
        )
        assert client.is_initialized
    with pytest.raises(ClientConfigError, match="keyword-only: pass host="):
        Client(creds, platform.url, notifications=False)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- consumer_factory


class _PluggedConsumer:
    """A host's own consumer: records its life; the host delivers through spec.on_message."""

    def __init__(self, spec: ConsumerSpec) -> None:
        self.spec = spec
        self.calls: list[str] = []

    @property
    def connected(self) -> bool:
        return self.calls == ["start"]

    def start(self) -> None:
        self.calls.append("start")

    def close(self, timeout: float = 5.0) -> None:
        self.calls.append("close")


def test_a_host_plugs_its_consumer_in_through_consumer_factory(
    platform: FakePlatform, tmp_path: Path
) -> None:
    made: list[_PluggedConsumer] = []

    def factory(spec: ConsumerSpec) -> _PluggedConsumer:
        made.append(_PluggedConsumer(spec))
        return made[-1]

    client, _ = make_client(
        platform, tmp_path, notifications=True, use_websocket=True, consumer_factory=factory
    )
    with client:
        (consumer,) = made
        spec = consumer.spec
        assert spec.transport == "websocket" and spec.credentials == client.credentials
        assert spec.websocket_url == platform.url.replace("http://", "ws://") + "/api/v1/ws"
        assert client.notifications_connected
        spec.on_message({"message_type": "aggregation_status", "body": {"aggregation_id": "a7"}})
        assert client.get_latest_aggregation_id() == "a7"
        assert spec.get_ticket()["ticket_id"]  # the client's own ticket call
    assert consumer.calls == ["start", "close"]


def test_a_factory_that_returns_no_consumer_is_a_config_error(
    platform: FakePlatform, tmp_path: Path
) -> None:
    with pytest.raises(ClientConfigError, match="returned int, which has no start"):
        make_client(platform, tmp_path, notifications=True, consumer_factory=lambda spec: 3)
    with pytest.raises(ClientConfigError, match="consumer_factory must be callable"):
        make_client(platform, tmp_path, consumer_factory="amqp")
