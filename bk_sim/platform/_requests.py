"""Reading untrusted request parts into a 4xx with its reason, never an exception.

Headers may carry any byte (aiohttp hands non-UTF-8 ones over as surrogates), a
``charset`` may name no codec, and JSON may nest deeper than Python's stack: each is
refused here with a status and one sentence, before a handler touches it.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from bk_sim.platform._limits import BudgetExhausted, ByteBudget
from bk_sim.platform._rounds import RequestRejected

#: Deepest JSON nesting accepted anywhere (configs and metrics are shallow documents).
MAX_JSON_DEPTH = 64
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})


def ascii_header(request: web.BaseRequest, name: str) -> str:
    """The header's value; 401 when it holds anything but printable ASCII."""
    value = request.headers.get(name, "")
    if not value.isascii() or not value.isprintable():
        raise RequestRejected(401, f"the {name} header must be printable ASCII")
    return value


def busy(exc: BudgetExhausted) -> RequestRejected:
    return RequestRejected(
        503,
        f"the platform is busy receiving other request bodies ({exc}); retry later",
        {"Retry-After": "2"},
    )


def parse_json(text: str | bytes, what: str) -> Any:
    """``json.loads`` with every failure a 400 naming ``what``, nesting bounded."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise RequestRejected(400, f"{what} nests too deeply") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestRejected(400, f"{what} is not valid JSON: {exc}") from exc
    if _depth(value) > MAX_JSON_DEPTH:
        raise RequestRejected(400, f"{what} nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value: iterative, memory proportional to the depth
    (not to the number of values, which may be millions)."""
    if not isinstance(value, (dict, list)):
        return 0
    stack = [iter(value.values() if isinstance(value, dict) else value)]
    deepest = 1
    while stack:
        for child in stack[-1]:
            if isinstance(child, (dict, list)):
                stack.append(iter(child.values() if isinstance(child, dict) else child))
                deepest = max(deepest, len(stack))
                if deepest > MAX_JSON_DEPTH:
                    return deepest
                break
        else:
            stack.pop()
    return deepest


async def json_body(request: web.Request, budget: ByteBudget, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object, read under the in-flight budget."""
    charset = (request.charset or "utf-8").lower()
    if charset not in _UTF8_CHARSETS:
        raise RequestRejected(415, f"unsupported charset {charset!r}; JSON bodies must be UTF-8")
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise RequestRejected(413, f"request body of {declared} bytes is over {max_bytes} bytes")
    try:
        held = await budget.acquire(declared if declared is not None else max_bytes)
    except BudgetExhausted as exc:
        raise busy(exc) from exc
    try:
        raw = bytearray()
        while chunk := await request.content.read(64 * 1024):
            raw.extend(chunk)
            if len(raw) > max_bytes:
                raise RequestRejected(413, f"request body is over {max_bytes} bytes")
    finally:
        await budget.release(held)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestRejected(400, f"request body is not valid JSON: {exc}") from exc
    body = parse_json(text, "request body")
    if not isinstance(body, dict):
        raise RequestRejected(400, "request body must be a JSON object")
    return body
