"""The client's public surface and its pure parts, with no server (PROTOCOL.md 2-6)."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from requests.adapters import BaseAdapter

import bk_sim
import bk_sim.client
from bk_sim.client import Client, Credentials, EventSink, RetryConfig, get_metadata
from bk_sim.client._client import (
    parse_notification,
    safe_download_path,
    websocket_url,
)
from bk_sim.client._http import HttpTransport, error_text, parse_retry_after
from bk_sim.client._metadata import metadata_dict
from bk_sim.errors import (
    ApiError,
    AuthError,
    ClientConfigError,
    NotFoundError,
    TransportError,
    UnsafeFileIdError,
    WeightsFormatError,
)
from bk_sim.redact import redact_url
from tests.support import Recorder

CREDS = Credentials(
    id="leaf-1", name="n", session_token="tok-xyz", owner_id="o", tree_id="t", branch_id="b"
)


def test_all_is_pinned_and_sorted() -> None:
    assert bk_sim.client.__all__ == [
        "AGGREGATED_OUTPUT_DIR",
        "ANALYTICS_BUNDLE_SUFFIXES",
        "APIConfig",
        "Client",
        "ClientEvent",
        "ConsumerFactory",
        "ConsumerSpec",
        "Credentials",
        "EventKind",
        "EventSink",
        "NAN_POLICY_OMIT",
        "NAN_POLICY_RAISE",
        "NotificationConsumer",
        "Observer",
        "PAYLOAD_KIND_FEDERATED_ANALYTICS",
        "PAYLOAD_KIND_FEDERATED_LEARNING",
        "RabbitMQConfig",
        "RetryConfig",
        "RunConfig",
        "SharedAmqpLoop",
        "Transport",
        "WebSocketConfig",
        "amqp_consumer",
        "attempts_left",
        "default_consumer",
        "get_metadata",
        "reconnect_delay",
        "websocket_consumer",
    ]
    for name in bk_sim.client.__all__:
        assert getattr(bk_sim.client, name) is not None


def test_client_has_the_seed_surface() -> None:
    methods = [
        "save_weights",
        "validate_weight_shape",
        "file_upload",
        "file_download",
        "send_performance_metrics",
        "get_branch_config",
        "get_run_details",
        "convert_pytorch_numpy",
        "disable_ssl_verification",
        "save_fields",
        "save_analytics",
        "get_latest_aggregation_id",
        "close",
        "__enter__",
        "__exit__",
    ]
    props = [
        "queue",
        "run_status",
        "run_number",
        "leaf_id",
        "branch_id",
        "tree_id",
        "user_id",
        "session_token",
        "is_initialized",
        "use_websocket",
        "output_dir",
    ]
    for name in methods:
        assert callable(getattr(Client, name)), name
    for name in props:
        assert isinstance(getattr(Client, name), property), name


# --------------------------------------------------------------------------- tensors, shapes


class FakeTensor:
    """Just enough of torch.Tensor: detach().cpu().numpy() sharing memory, like torch."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.calls: list[str] = []

    @property
    def shape(self) -> tuple[int, ...]:
        return self.arr.shape

    def detach(self) -> FakeTensor:
        self.calls.append("detach")
        return self

    def cpu(self) -> FakeTensor:
        self.calls.append("cpu")
        return self

    def numpy(self) -> np.ndarray:
        self.calls.append("numpy")
        return self.arr


def test_convert_pytorch_numpy_takes_named_tensors_and_snapshots_them() -> None:
    w = FakeTensor(np.ones((2, 3), np.float32))
    b = FakeTensor(np.zeros(3, np.float32))
    weighting, params = Client.convert_pytorch_numpy(
        iter([("fc.weight", w), ("fc.bias", b)]), weighting=1530
    )
    assert weighting == 1530
    assert [p.shape for p in params] == [(2, 3), (3,)] and params[0].dtype == np.float32
    assert w.calls == ["detach", "cpu", "numpy"]
    w.arr += 5  # training goes on: the converted copy must not change
    np.testing.assert_array_equal(params[0], np.ones((2, 3)))


def test_convert_pytorch_numpy_takes_bare_tensors_and_arrays() -> None:
    arr = np.arange(4.0)
    _, params = Client.convert_pytorch_numpy([FakeTensor(np.eye(2)), arr, [1, 2]], weighting=1.0)
    np.testing.assert_array_equal(params[0], np.eye(2))
    np.testing.assert_array_equal(params[1], arr)
    assert params[1] is not arr
    np.testing.assert_array_equal(params[2], [1, 2])


def test_convert_then_save_round_trips(tmp_path: Path) -> None:
    weighting, params = Client.convert_pytorch_numpy(
        [("a", FakeTensor(np.full((3, 2), 0.5, np.float32)))], weighting=7
    )
    path = Client.save_weights(str(tmp_path / "m"), weighting, params, compression="fast")
    assert isinstance(path, str) and path.endswith("m.npz")
    got_w, got = bk_sim.weights.read_weights(path)
    assert got_w == 7.0
    np.testing.assert_array_equal(got[0], params[0])


def test_convert_pytorch_numpy_defaults_the_weighting_to_one() -> None:
    weighting, params = Client.convert_pytorch_numpy([("w", FakeTensor(np.ones(2)))])
    assert weighting == 1 and len(params) == 1


def test_validate_weight_shape_checks_an_open_file_and_rewinds_it(tmp_path: Path) -> None:
    path = Client.save_weights(str(tmp_path / "w"), 1.0, [np.zeros((4, 3), np.float32)])
    with open(path, "rb") as f:
        assert Client.validate_weight_shape(f) is True
        assert f.tell() == 0
        assert f.read(2) == b"PK"  # still readable from the start for the upload


def test_validate_weight_shape_refuses_what_is_not_an_open_file(tmp_path: Path) -> None:
    path = Client.save_weights(str(tmp_path / "w"), 1.0, [np.zeros(2)])
    f = open(path, "rb")  # noqa: SIM115 - closed on purpose below
    f.close()
    with pytest.raises(WeightsFormatError, match="cannot read and rewind"):
        Client.validate_weight_shape(f)
    with pytest.raises(WeightsFormatError, match="cannot read and rewind"):
        Client.validate_weight_shape(tmp_path / "missing.npz")
    assert Client.validate_weight_shape(path)  # a path is accepted too


def _npz(tmp_path: Path, name: str, **arrays: Any) -> Path:
    target = tmp_path / f"{name}.npz"
    np.savez(target, **arrays)
    return target


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"layer_0": np.ones(2)}, "no 'weighting'"),
        ({"weighting": np.ones(2), "layer_0": np.ones(2)}, "exactly one value"),
        ({"weighting": np.ones(1)}, "no layer_"),
        (
            {"__bk_payload_kind__": np.array("federated_analytics"), "weighting": np.zeros(1)},
            "no named fields",
        ),
        (
            {"__bk_payload_kind__": np.array("federated_analytics"), "layer_0": np.ones(1)},
            "positional layer name",
        ),
        ({"__bk_payload_kind__": np.array("federated_analytics"), "x": np.array(3.0)}, "0-d"),
        ({"__bk_payload_kind__": np.array("gossip"), "x": np.ones(1)}, "must be one of"),
    ],
)
def test_validate_weight_shape_refuses_by_kind(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = _npz(tmp_path, "bad", **arrays)
    with open(path, "rb") as f, pytest.raises(WeightsFormatError, match=message):
        Client.validate_weight_shape(f)


def test_validate_weight_shape_accepts_an_analytics_archive(tmp_path: Path) -> None:
    path = _npz(
        tmp_path,
        "fa",
        __bk_payload_kind__=np.array("federated_analytics"),
        weighting=np.zeros(1),
        age_n=np.array([3]),
        site=np.array(["a"]),
    )
    with open(path, "rb") as f:
        assert Client.validate_weight_shape(f) is True


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        ({"message_type": "aggregation_status", "body": {"aggregation_id": "a"}}, "a"),
        ({"message_type": "run_status", "body": {"run_status": "pause"}}, "pause"),
    ],
)
def test_parse_notification_accepts_the_contract(msg: dict[str, Any], expected: str) -> None:
    note = parse_notification(msg)
    assert (note.message_type, note.value) == (msg["message_type"], expected)


@pytest.mark.parametrize(
    "msg",
    [
        None,
        [],
        {"message_type": "aggregation_status"},
        {"message_type": "aggregation_status", "body": {"aggregation_id": ""}},
        {"message_type": "aggregation_status", "body": {"aggregation_id": 5}},
        {"message_type": "run_status", "body": {"run_status": "START"}},
        {"message_type": "other", "body": {}},
    ],
)
def test_parse_notification_refuses_malformed_messages(msg: Any) -> None:
    with pytest.raises(ValueError):
        parse_notification(msg)


@pytest.mark.parametrize(
    "file_id", ["../x", "a/b", "", "..", ".", "/abs", "a\\b", "x\x00y", ".tmp", "c:evil", None, 3]
)
def test_unsafe_file_ids(tmp_path: Path, file_id: Any) -> None:
    with pytest.raises(UnsafeFileIdError):
        safe_download_path(tmp_path, file_id)


def test_safe_file_ids_land_in_the_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert safe_download_path(out, "6f1c-9d2e_a.b") == out / "6f1c-9d2e_a.b.npz"


def test_upload_metadata_holds_the_contract_keys() -> None:
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    meta = metadata_dict(
        file_size=10,
        file_digest="sha256=x",
        kind="federated_analytics",
        timestamp=when,
        custom={"a": 1},
    )
    assert meta == {
        "client_version": bk_sim.__version__,
        "timestamp": "2026-01-02T03:04:05+00:00",
        "file_size": 10,
        "file_digest": "sha256=x",
        "kind": "federated_analytics",
        "custom": {"a": 1},
    }
    json.dumps(meta)


def test_get_metadata_is_a_json_string_in_the_published_order() -> None:
    meta = json.loads(get_metadata(False, 10, "sha256=x", "federated_learning", {"gpu": 1}))
    assert meta == {
        "client_version": bk_sim.__version__,
        "file_size": 10,
        "file_digest": "sha256=x",
        "kind": "federated_learning",
        "device_info": {"gpu": 1},
    }
    assert "kind" not in json.loads(get_metadata())  # omitted when unknown
    assert "timestamp" in json.loads(get_metadata())


def test_get_metadata_refuses_2_9_0_positional_device_info() -> None:
    with pytest.raises(ClientConfigError, match="2.9.0 took device_info in this position"):
        get_metadata(True, 10, "sha256=x", {"gpu": "A100"})
    with pytest.raises(ClientConfigError, match="kind must be None or one of"):
        get_metadata(kind="federated_gossip")


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("https://app.branchkey.com", "wss://app.branchkey.com/api/v1/ws"),
        ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/api/v1/ws"),
        ("https://h/prefix", "wss://h/prefix/api/v1/ws"),
    ],
)
def test_websocket_url(host: str, url: str) -> None:
    assert websocket_url(host) == url


def test_parse_retry_after() -> None:
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-2") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 7, usegmt=True), now=now) == 7.0
    assert parse_retry_after(email.utils.formatdate(now - 7, usegmt=True), now=now) == 0.0


def test_error_text_and_redaction() -> None:
    assert error_text(b'{"error": "weighting must be > 0"}') == "weighting must be > 0"
    assert error_text(b"") == "(empty body)"
    assert error_text(b"x" * 500).endswith("...") and len(error_text(b"x" * 500)) == 203
    assert error_text(b'{"data": 1}') == '{"data": 1}'
    assert redact_url("http://h/blob/1?sig=secret#f") == "http://h/blob/1"


# --------------------------------------------------------------------------- retry loop offline


class Scripted(BaseAdapter):
    """A requests adapter that plays a script: a status int, or an exception to raise."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__()
        self.script = list(script)
        self.sent: list[tuple[requests.PreparedRequest, dict[str, Any]]] = []

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append((request, kwargs))
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        status, headers, body = step if isinstance(step, tuple) else (step, {}, None)
        resp = requests.Response()
        resp.status_code = status
        resp.headers.update(headers)
        resp._content = (
            body
            if body is not None
            else json.dumps(
                {"data": {"ok": True}} if status < 400 else {"error": f"status {status}"}
            ).encode()
        )
        resp.request = request
        resp.url = request.url or ""
        return resp

    def close(self) -> None:
        pass


def transport(
    script: list[Any], **retry: Any
) -> tuple[HttpTransport, Scripted, list[float], Recorder]:
    rec = Recorder()
    t = HttpTransport(
        "http://platform.test",
        CREDS,
        RetryConfig(**retry),
        EventSink(rec, CREDS.id),
        proxies={"http": "socks5://127.0.0.1:1080", "https": "socks5h://127.0.0.1:1080"},
    )
    adapter = Scripted(script)
    t._session.mount("http://", adapter)
    slept: list[float] = []
    t.sleep = slept.append
    return t, adapter, slept, rec


def test_schedule_is_backoff_factor_times_two_to_the_n_minus_one() -> None:
    t, adapter, slept, rec = transport([503, 500, 502, 200], max_retries=3, backoff_factor=1.0)
    result = t.request("GET", t.url("/x"), endpoint="x")
    assert result.body == {"data": {"ok": True}}
    assert slept == [1.0, 2.0, 4.0]  # the documented schedule, not urllib3's 0, 2, 4
    assert [e.kind for e in rec.events] == ["http_request", "retry_wait"] * 3 + ["http_request"]
    assert [e.delay_s for e in rec.events if e.kind == "retry_wait"] == [1.0, 2.0, 4.0]


def test_proxies_and_timeout_reach_requests() -> None:
    t, adapter, _, _ = transport([200], total_timeout=7)
    t.request("GET", t.url("/x"), endpoint="x")
    ((_, kwargs),) = adapter.sent
    assert kwargs["proxies"]["http"] == "socks5://127.0.0.1:1080"
    assert kwargs["proxies"]["https"] == "socks5h://127.0.0.1:1080"
    assert kwargs["timeout"] == 7 and kwargs["verify"] is not False  # True or a CA bundle


def test_disabled_verification_reaches_requests() -> None:
    t, adapter, _, _ = transport([200])
    t.verify = False
    t.request("GET", t.url("/x"), endpoint="x")
    assert adapter.sent[0][1]["verify"] is False


def test_retry_after_replaces_backoff_on_429_and_503_only() -> None:
    script = [
        (429, {"Retry-After": "9"}, None),
        (503, {"Retry-After": "3"}, None),
        (500, {"Retry-After": "50"}, None),
        200,
    ]
    t, _, slept, _ = transport(script, max_retries=3, backoff_factor=0.5)
    t.request("POST", t.url("/x"), endpoint="x")
    assert slept == [9.0, 3.0, 2.0]


def test_retry_after_is_capped_by_max_backoff() -> None:
    t, _, slept, _ = transport([(503, {"Retry-After": "3600"}, None), 200], max_backoff=60)
    t.request("GET", t.url("/x"), endpoint="x")
    assert slept == [60.0]


def test_connection_errors_are_retried_then_translated() -> None:
    boom = requests.exceptions.ConnectionError("connection refused")
    t, adapter, slept, rec = transport([boom, boom, boom], max_retries=2, backoff_factor=0.1)
    with pytest.raises(TransportError, match="no answer after 3 attempt.*connection refused") as i:
        t.request("GET", t.url("/x"), endpoint="x")
    assert isinstance(i.value.__cause__, requests.exceptions.ConnectionError)
    assert slept == pytest.approx([0.1, 0.2])
    assert all(e.error and "ConnectionError" in e.error for e in rec.events)


def test_a_url_urllib_cannot_split_is_a_transport_error_without_its_query() -> None:
    t, adapter, _, _ = transport([])
    assert redact_url("http://[::1/blob?sig=SECRET") == "http://[::1/blob"
    with pytest.raises(TransportError, match="bad request") as info:
        t.request("GET", "http://[::1/blob?sig=SECRET", endpoint="download")
    assert "SECRET" not in str(info.value) and adapter.sent == []


def test_transport_errors_do_not_show_a_signed_url_query() -> None:
    boom = requests.exceptions.ConnectionError(
        "HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: "
        "/blob/1?sig=SECRETSIG&exp=9 (Caused by NewConnectionError('refused'))"
    )
    t, _, _, rec = transport([boom], max_retries=0)
    with pytest.raises(TransportError) as info:
        t.request("GET", "http://platform.test/blob/1?sig=SECRETSIG", endpoint="download")
    assert "SECRETSIG" not in str(info.value) and "refused" in str(info.value)
    assert all("SECRETSIG" not in repr(e.to_dict()) for e in rec.events)


def test_tls_errors_are_not_retried() -> None:
    t, adapter, slept, _ = transport([requests.exceptions.SSLError("bad cert")])
    with pytest.raises(TransportError, match="bad cert"):
        t.request("GET", t.url("/x"), endpoint="x")
    assert slept == [] and len(adapter.sent) == 1


@pytest.mark.parametrize(
    ("status", "cls"), [(400, ApiError), (401, AuthError), (403, AuthError), (404, NotFoundError)]
)
def test_other_4xx_fail_at_once(status: int, cls: type[ApiError]) -> None:
    t, adapter, slept, _ = transport([status])
    with pytest.raises(cls) as info:
        t.request("GET", t.url("/x"), endpoint="x")
    assert info.value.status == status and info.value.message == f"status {status}"
    assert slept == [] and len(adapter.sent) == 1


def test_an_unexpected_success_status_is_an_error() -> None:
    t, _, _, _ = transport([200])
    with pytest.raises(ApiError, match="expected HTTP 201"):
        t.request("POST", t.url("/x"), endpoint="x", expect=(201,))


def test_a_non_json_success_is_an_error() -> None:
    t, _, _, _ = transport([(200, {}, b"<html>")])
    with pytest.raises(ApiError, match="not JSON"):
        t.request("GET", t.url("/x"), endpoint="x")


def test_a_body_nested_too_deep_for_json_is_an_api_error() -> None:
    deep = b"[" * 100_000  # json.loads raises RecursionError here, not ValueError
    t, _, _, _ = transport([(200, {}, deep), (400, {}, deep)])
    with pytest.raises(ApiError, match="not JSON"):
        t.request("GET", t.url("/x"), endpoint="x")
    with pytest.raises(ApiError, match=r"HTTP 400: \[\[\[") as info:
        t.request("GET", t.url("/x"), endpoint="x")
    assert info.value.status == 400


def test_headers_carry_the_bearer_pair_unless_unauthenticated() -> None:
    t, adapter, _, _ = transport([200, (200, {}, b"raw")])
    t.request("GET", t.url("/x"), endpoint="x")
    t.request(
        "GET",
        "http://platform.test/blob?sig=1",
        endpoint="download",
        accept="*/*",
        authenticated=False,
        parse_json=False,
    )
    first, second = (r.headers for r, _ in adapter.sent)
    assert first["Authorization"] == "Bearer leaf-1:tok-xyz" and first["LEAF"] == "true"
    assert first["accept"] == "application/json"
    assert "Authorization" not in second and "LEAF" not in second and second["accept"] == "*/*"


@pytest.mark.parametrize(
    ("method", "url", "kwargs"),
    [
        ("GET", "http://platform.test/api/v1/run/b%2F1", {}),
        ("POST", "http://platform.test/api/v1/performance/analysis", {"json_body": {"a": [1]}}),
        (
            "POST",
            "http://platform.test/api/v1/file/upload",
            {"data": b"--x\r\nbody", "headers": {"Content-Type": "multipart/form-data"}},
        ),
        ("GET", "http://platform.test/blob/1 x?sig=a b&exp=9", {"authenticated": False}),
        ("GET", "http://user:pw@platform.test/x", {}),  # requests turns userinfo into Basic
        ("GET", "http://bücher.test/x", {"accept": "*/*"}),
    ],
)
def test_prepared_requests_equal_requests_own_preparation(
    method: str, url: str, kwargs: dict[str, Any]
) -> None:
    t, _, _, _ = transport([])
    json_body, data = kwargs.get("json_body"), kwargs.get("data")
    headers = {"accept": kwargs.get("accept", "application/json")}
    if kwargs.get("authenticated", True):
        headers.update(Authorization="Bearer leaf-1:tok-xyz", LEAF="true")
    headers.update(kwargs.get("headers", {}))
    want = requests.Request(method, url, headers=headers, json=json_body, data=data).prepare()
    for _ in range(2):  # the second time with the remembered URL
        got = t._prepare(
            method,
            url,
            json_body,
            data,
            kwargs.get("headers"),
            kwargs.get("accept", "application/json"),
            kwargs.get("authenticated", True),
        )
        assert (got.method, got.url, got.body) == (want.method, want.url, want.body)
        assert dict(got.headers) == dict(want.headers)
        assert list(got.headers) == list(want.headers)  # same order on the wire
        assert got.hooks == want.hooks and dict(got._cookies) == dict(want._cookies)


def test_a_refused_authorization_header_never_shows_the_token() -> None:
    # Credentials refuse line breaks; this is the transport's own guard behind that check.
    creds = type("C", (), {"id": "leaf-1", "session_token": "tok-SECRET\n"})()
    t = HttpTransport("http://platform.test", creds, RetryConfig(), EventSink(None, "leaf-1"))
    with pytest.raises(TransportError, match="InvalidHeader in the Authorization") as info:
        t.request("GET", t.url("/x"), endpoint="x")
    assert "tok-SECRET" not in str(info.value) and info.value.__cause__ is None
    assert info.value.__suppress_context__


# --------------------------------------------------------------------------- drop-in API


def test_credentials_take_the_published_positional_order() -> None:
    creds = Credentials("leaf", "name", "tok", "tree", "branch", "owner")
    assert (creds.tree_id, creds.branch_id, creds.owner_id) == ("tree", "branch", "owner")


def test_retry_strategy_waits_the_documented_times_not_urllib3s() -> None:
    from urllib3.util.retry import RequestHistory

    cfg = RetryConfig(max_retries=4, backoff_factor=1.0, max_backoff=3.0)
    strategy = cfg.get_retry_strategy()
    waits = []
    for n in range(1, 5):
        history = tuple(RequestHistory("GET", "/x", None, 503, None) for _ in range(n))
        waits.append(strategy.new(history=history).get_backoff_time())
    assert waits == [1.0, 2.0, 3.0, 3.0]  # urllib3 itself: 0, 2, 4, 8
    assert strategy.total == 4 and 503 in strategy.status_forcelist


def test_create_session_mounts_the_strategy_for_both_schemes() -> None:
    session = RetryConfig(max_retries=2).create_session()
    try:
        for prefix in ("http://", "https://"):
            retries = session.get_adapter(prefix + "h").max_retries  # type: ignore[attr-defined]
            assert retries.total == 2 and retries.new().get_backoff_time() == 0.0
    finally:
        session.close()
