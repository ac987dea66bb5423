"""A small synchronous client for the platform's admin API (harness and tests use it)."""

from __future__ import annotations

import time
from typing import Any

import requests

from bk_sim.errors import PlatformError

_DONE = ("aggregated", "failed", "abandoned")


class AdminClient:
    """``AdminClient(url, token)``; every failure is a ``PlatformError`` with the reason."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.url}{path}"
        try:
            resp = self._session.request(method, url, json=body, timeout=self._timeout)
        except requests.RequestException as exc:
            raise PlatformError(f"platform admin API {method} {path} got no answer: {exc}") from exc
        try:
            payload = resp.json()
        except ValueError:
            payload = {}
        if resp.status_code >= 400:
            reason = payload.get("error") if isinstance(payload, dict) else None
            raise PlatformError(
                f"platform admin API {method} {path} failed with HTTP {resp.status_code}: "
                f"{reason or resp.text[:200]}"
            )
        return payload.get("data") if isinstance(payload, dict) else payload

    # -- entities
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/healthz")
        return result

    def create_tree(self, name: str) -> str:
        return str(self._call("POST", "/admin/v1/trees", {"name": name})["tree_id"])

    def delete_tree(self, tree_id: str) -> None:
        """Remove a tree, its branches and leaves, and their vhost and broker users."""
        self._call("DELETE", f"/admin/v1/trees/{tree_id}")

    def create_branch(
        self,
        tree_id: str,
        name: str = "branch",
        *,
        strategy: str = "fedavg",
        quorum: int | None = None,
        round_timeout_s: float | None = None,
        trim_fraction: float = 0.1,
        model_config: dict[str, Any] | None = None,
        field_ops: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "tree_id": tree_id,
            "name": name,
            "strategy": strategy,
            "quorum": quorum,
            "round_timeout_s": round_timeout_s,
            "trim_fraction": trim_fraction,
            "model_config": model_config or {},
        }
        if field_ops:  # FA: {field name: sum | min | max | must_match}
            body["field_ops"] = field_ops
        result: dict[str, Any] = self._call("POST", "/admin/v1/branches", body)
        return result

    def create_leaves(
        self, branch_id: str, count: int, name_prefix: str = "leaf"
    ) -> list[dict[str, str]]:
        """Leaf credentials: dicts with the six fields of PROTOCOL.md section 1."""
        data = self._call(
            "POST",
            f"/admin/v1/branches/{branch_id}/leaves",
            {"count": count, "name_prefix": name_prefix},
        )
        return list(data["leaves"])

    def set_run_status(self, branch_id: str, run_status: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "PUT", f"/admin/v1/branches/{branch_id}/run", {"run_status": run_status}
        )
        return result

    def config(self, branch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/branches/{branch_id}/config")
        return result

    def set_config(self, branch_id: str, **fields: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/branches/{branch_id}/config", fields)
        return result

    # -- rounds
    def rounds(self, branch_id: str) -> list[dict[str, Any]]:
        """Every round record of the branch (the listing is paginated: all pages)."""
        return self._all_pages(f"/admin/v1/branches/{branch_id}/rounds", "rounds")

    def _all_pages(self, path: str, key: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after: Any = 0
        while True:
            page = self._call("GET", f"{path}?after={after}")
            out.extend(page[key])
            after = page.get("next_after")
            if after is None:
                return out

    def round(self, branch_id: str, number: int) -> dict[str, Any]:
        result: dict[str, Any] = self._call(
            "GET", f"/admin/v1/branches/{branch_id}/rounds/{number}"
        )
        return result

    def wait_round(
        self, branch_id: str, number: int, *, timeout: float = 30.0, interval: float = 0.05
    ) -> dict[str, Any]:
        """Poll until round ``number`` is aggregated or failed; ``PlatformError`` on timeout."""
        deadline = time.monotonic() + timeout
        record: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            page = self._call(
                "GET", f"/admin/v1/branches/{branch_id}/rounds?after={number - 1}&limit=1"
            )["rounds"]
            if page and page[0]["round"] == number:
                record = page[0]
                if record["status"] in _DONE:
                    return record
            time.sleep(interval)
        state = record["status"] if record else "not opened"
        raise PlatformError(
            f"round {number} of branch {branch_id} not done after {timeout:g}s (status: {state})"
        )

    # -- faults, stats, metrics
    def set_faults(self, branch_id: str, faults: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self._call("PUT", f"/admin/v1/branches/{branch_id}/faults", faults)
        return result

    def clear_faults(self, branch_id: str) -> dict[str, Any]:
        return self.set_faults(branch_id, {})

    def faults(self, branch_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/admin/v1/branches/{branch_id}/faults")
        return result

    def stats(self) -> dict[str, dict[str, int]]:
        return dict(self._call("GET", "/admin/v1/stats")["requests"])

    def limits_stats(self) -> dict[str, Any]:
        """The connection guard's and the memory budget's counters."""
        data = self._call("GET", "/admin/v1/stats")
        return {"connections": data["connections"], "inflight_bytes": data["inflight_bytes"]}

    def reset_stats(self) -> None:
        self._call("DELETE", "/admin/v1/stats")

    def metrics(self, branch_id: str) -> list[dict[str, Any]]:
        """Every metrics row of the branch (all pages)."""
        return self._all_pages(f"/admin/v1/branches/{branch_id}/metrics", "metrics")
