"""Federated-analytics archives built with numpy directly, and raw FA uploads."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import requests

from bk_sim.weights import digest_header
from tests.integration._platform_support import leaf_headers

KIND_KEY = "__bk_payload_kind__"
FA = "federated_analytics"


def fa_archive(fields: Mapping[str, Any], *, kind: str | None = FA, weighting: Any = 0.0) -> bytes:
    """An FA archive as the published 3.0.1 client writes one (``weighting`` 0.0)."""
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in fields.items()}
    if weighting is not None:
        arrays["weighting"] = np.array([weighting], dtype=np.float64)
    if kind is not None:
        arrays[KIND_KEY] = np.array(kind)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def bundle(name: str, values: np.ndarray) -> dict[str, np.ndarray]:
    """The six-field analytics bundle of a raw column, NaNs omitted."""
    x = np.asarray(values, dtype=np.float64)
    nan = int(np.isnan(x).sum())
    x = x[~np.isnan(x)]
    return {
        f"{name}_n": np.array([x.size], np.int64),
        f"{name}_sum": np.array([x.sum()], np.float64),
        f"{name}_sumsq": np.array([(x * x).sum()], np.float64),
        f"{name}_min": np.array([x.min()], np.float64),
        f"{name}_max": np.array([x.max()], np.float64),
        f"{name}_nan": np.array([nan], np.int64),
    }


def post_fa(
    url: str, leaf: dict[str, str], data: bytes, *, meta_kind: str | None = FA
) -> requests.Response:
    """A raw upload whose metadata declares ``meta_kind`` (None: no kind)."""
    hdr = leaf_headers(leaf)
    hdr["x-bk-file-size"] = str(len(data))
    hdr["x-bk-file-digest"] = digest_header(data)
    meta: dict[str, Any] = {"client_version": "test"}
    if meta_kind is not None:
        meta["kind"] = meta_kind
    form = json.dumps({"leaf_name": leaf["name"], "metadata": json.dumps(meta)})
    return requests.post(
        f"{url}/api/v1/file/upload",
        headers=hdr,
        files={"file": ("a.npz", data, "application/octet-stream")},
        data={"data": form},
        timeout=10,
    )


def download_fields(url: str, leaf: dict[str, str], file_id: str) -> dict[str, np.ndarray]:
    resp = requests.get(
        f"{url}/api/v1/file/download/{file_id}", headers=leaf_headers(leaf), timeout=10
    )
    assert resp.status_code == 200, resp.text
    blob = requests.get(resp.json()["data"]["download_url"], timeout=10)
    assert blob.status_code == 200 and blob.content
    with np.load(io.BytesIO(blob.content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
