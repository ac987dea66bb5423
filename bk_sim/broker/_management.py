"""A small synchronous client for the RabbitMQ management HTTP API.

The platform provisions leaves through it, chaos force-closes connections through it,
and tests build topologies with it. Every failure becomes a ``BrokerError`` that names
the call and the broker's answer.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests

from bk_sim.errors import BrokerError

DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"


def _q(name: str) -> str:
    return quote(name, safe="")


class ManagementAPI:
    """``ManagementAPI("http://user:pass@host:15672/")``; credentials come from the URL."""

    def __init__(self, url: str = DEFAULT_MANAGEMENT_URL, *, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            shown = url.replace(parts.password, "***") if parts.password else url
            raise BrokerError(
                f"management URL must be http(s)://user:pass@host:port/, got {shown!r}"
            )
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/api", "", ""))
        self._session = requests.Session()
        # Percent-decoded, as the broker probe and pika do: a password with '@' or '/' is
        # written %40 / %2F in a URL.
        self._session.auth = (
            unquote(parts.username or "guest"),
            unquote(parts.password or "guest"),
        )
        self._timeout = timeout

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
        url = f"{self.base}/{path}"
        try:
            resp = self._session.request(
                method,
                url,
                data=None if body is None else json.dumps(body),
                headers={"content-type": "application/json"},
                timeout=self._timeout,
            )
        except requests.RequestException as exc:
            raise BrokerError(
                f"RabbitMQ management API at {self.base} did not answer {method} /{path}: {exc}"
            ) from exc
        if resp.status_code in ok:
            return None
        if resp.status_code == 401:
            raise BrokerError(
                f"RabbitMQ management API at {self.base} refused the credentials (401)"
            )
        if resp.status_code >= 400:
            raise BrokerError(
                f"RabbitMQ management API {method} /{path} failed with HTTP "
                f"{resp.status_code}: {resp.text[:200]}"
            )
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise BrokerError(
                f"RabbitMQ management API {method} /{path} answered HTTP {resp.status_code} "
                f"but not with JSON (is {self.base} RabbitMQ's management API?)"
            ) from exc

    # -- reads
    def overview(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "overview")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "nodes")
        return result

    def connections(self, user: str | None = None) -> list[dict[str, Any]]:
        conns: list[dict[str, Any]] = self._call("GET", "connections") or []
        return [c for c in conns if user is None or c.get("user") == user]

    def queue(self, vhost: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"queues/{_q(vhost)}/{_q(name)}")
        return result

    # -- topology
    def create_vhost(self, vhost: str) -> None:
        self._call("PUT", f"vhosts/{_q(vhost)}", {})

    def delete_vhost(self, vhost: str) -> None:
        self._call("DELETE", f"vhosts/{_q(vhost)}", ok=(404,))

    def create_user(self, user: str, password: str, tags: str = "") -> None:
        self._call("PUT", f"users/{_q(user)}", {"password": password, "tags": tags})

    def delete_user(self, user: str) -> None:
        self._call("DELETE", f"users/{_q(user)}", ok=(404,))

    def set_permissions(
        self, vhost: str, user: str, configure: str = "", write: str = "", read: str = ""
    ) -> None:
        self._call(
            "PUT",
            f"permissions/{_q(vhost)}/{_q(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    def declare_exchange(self, vhost: str, name: str, kind: str = "fanout") -> None:
        self._call(
            "PUT",
            f"exchanges/{_q(vhost)}/{_q(name)}",
            {"type": kind, "durable": True, "auto_delete": False},
        )

    def declare_queue(self, vhost: str, name: str) -> None:
        self._call("PUT", f"queues/{_q(vhost)}/{_q(name)}", {"durable": True, "auto_delete": False})

    def delete_queue(self, vhost: str, name: str) -> None:
        self._call("DELETE", f"queues/{_q(vhost)}/{_q(name)}", ok=(404,))

    def bind(self, vhost: str, exchange: str, queue: str, routing_key: str = "") -> None:
        self._call(
            "POST",
            f"bindings/{_q(vhost)}/e/{_q(exchange)}/q/{_q(queue)}",
            {"routing_key": routing_key},
        )

    # -- faults
    def close_user_connections(self, user: str, reason: str = "bk-sim fault") -> None:
        """Force-close every connection of ``user`` at once (clients see 320)."""
        self._call(
            "DELETE",
            f"connections/username/{_q(user)}",
            ok=(404,),
        )

    def close_connection(self, name: str) -> None:
        self._call("DELETE", f"connections/{_q(name)}", ok=(404,))
