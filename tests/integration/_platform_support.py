"""Helpers for the reference-platform tests: a branch with leaves, raw leaf requests,
the leaves' AMQP queues read as the leaf user, and numpy reference aggregates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pika
import requests

from bk_sim.platform import AdminClient, PlatformHandle
from bk_sim.weights import digest_header, encode_weights, read_layers

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def leaf_headers(leaf: dict[str, str]) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {leaf['id']}:{leaf['session_token']}",
        "accept": "application/json",
        "LEAF": "true",
    }


def post_upload(
    url: str,
    leaf: dict[str, str],
    data: bytes,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> requests.Response:
    """A raw upload, shaped as PROTOCOL.md section 2 says; ``headers`` override."""
    hdr = leaf_headers(leaf)
    hdr["x-bk-file-size"] = str(len(data))
    hdr["x-bk-file-digest"] = digest_header(data)
    hdr.update(headers or {})
    form = json.dumps({"leaf_name": leaf["name"], "metadata": json.dumps({"client_version": "t"})})
    return requests.post(
        f"{url}/api/v1/file/upload",
        headers=hdr,
        files={"file": ("w.npz", data, "application/octet-stream")},
        data={"data": form},
        timeout=timeout,
    )


@dataclass
class Branch:
    """A tree + branch + leaves on a running platform, deleted on exit."""

    url: str
    admin: AdminClient
    tree_id: str
    branch_id: str
    leaves: list[dict[str, str]]

    def upload(
        self, i: int, weighting: float, layers: Sequence[np.ndarray], **kw: Any
    ) -> requests.Response:
        return post_upload(self.url, self.leaves[i], encode_weights(weighting, layers), **kw)

    def upload_ok(self, i: int, weighting: float, layers: Sequence[np.ndarray]) -> str:
        resp = self.upload(i, weighting, layers)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["data"]["file_id"])

    def wait(self, number: int, timeout: float = 20) -> dict[str, Any]:
        return self.admin.wait_round(self.branch_id, number, timeout=timeout)

    def download(self, i: int, file_id: str) -> list[np.ndarray]:
        resp = requests.get(
            f"{self.url}/api/v1/file/download/{file_id}",
            headers=leaf_headers(self.leaves[i]),
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        blob = requests.get(resp.json()["data"]["download_url"], timeout=10)
        assert blob.status_code == 200 and blob.content
        return read_layers(blob.content)


@contextmanager
def make_branch(
    handle: PlatformHandle, leaves: int, *, start: bool = True, **config: Any
) -> Iterator[Branch]:
    admin = handle.admin
    tree_id = admin.create_tree(f"test-{uuid.uuid4().hex[:10]}")
    try:
        branch = admin.create_branch(tree_id, "b", **config)
        creds = admin.create_leaves(branch["branch_id"], leaves)
        if start:
            admin.set_run_status(branch["branch_id"], "start")
        yield Branch(handle.url, admin, tree_id, branch["branch_id"], creds)
    finally:
        admin.delete_tree(tree_id)


def read_queue(leaf: dict[str, str], expect: int, timeout: float = 10) -> list[dict[str, Any]]:
    """Messages in the leaf's queue, read as the leaf itself (its own credentials)."""
    params = pika.URLParameters(AMQP_URL)
    params.virtual_host = leaf["tree_id"]
    params.credentials = pika.PlainCredentials(leaf["id"], leaf["session_token"])
    conn = pika.BlockingConnection(params)
    out: list[dict[str, Any]] = []
    try:
        ch = conn.channel()
        deadline = time.monotonic() + timeout
        while len(out) < expect and time.monotonic() < deadline:
            method, props, body = ch.basic_get(leaf["id"], auto_ack=True)
            if method is None:
                time.sleep(0.05)
                continue
            assert props.delivery_mode == 2, "notifications must be persistent"
            out.append(json.loads(body))
        # Nothing beyond what was expected.
        time.sleep(0.1)
        method, _, body = ch.basic_get(leaf["id"], auto_ack=True)
        if method is not None:
            out.append(json.loads(body))
    finally:
        conn.close()
    return out


def model(rng: np.random.Generator, dtype: Any = np.float32) -> list[np.ndarray]:
    return [rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal(5).astype(dtype)]


def reference(
    strategy: str,
    weights: Sequence[float],
    models: Sequence[Sequence[np.ndarray]],
    trim_fraction: float = 0.1,
) -> list[np.ndarray]:
    """The aggregate computed the plain numpy way, in float64, cast to the layer dtype."""
    out = []
    w = np.asarray(weights, dtype=np.float64)
    for k in range(len(models[0])):
        stack = np.stack([np.asarray(m[k], dtype=np.float64) for m in models])
        if strategy == "fedavg":
            val = np.tensordot(w, stack, axes=1) / w.sum()
        elif strategy == "mean":
            val = stack.mean(axis=0)
        elif strategy == "median":
            val = np.median(stack, axis=0)
        elif strategy == "trimmed_mean":
            cut = int(np.floor(trim_fraction * len(models)))
            s = np.sort(stack, axis=0)
            val = s[cut : len(models) - cut].mean(axis=0)
        else:
            raise ValueError(strategy)
        out.append(val.astype(models[0][k].dtype))
    return out


def assert_layers(actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
