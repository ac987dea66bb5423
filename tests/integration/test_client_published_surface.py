"""bk_sim.client against the published branchkey 2.9.0 and 3.0.1, read from their wheels.

The wheels are downloaded once (pytest's cache, keyed by version) and never installed or
imported: their Python sources are parsed with ``ast`` to get the exported names,
function signatures, dataclass fields and properties. Code written against either
release must run unchanged on ``bk_sim.client``: same names, same positional parameters
in the same order with the same defaults, same return types, same field order. Every
deliberate difference is listed in ``DIFFERENCES`` with its reason (docs/client.md).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import bk_sim.client

VERSIONS = ("2.9.0", "3.0.1")
_NETWORK_HINTS = (
    "Could not fetch URL",
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "Connection refused",
    "timed out",
)

#: (version or "*", "Class.member" or "Class.member:param") -> why we differ on purpose.
DIFFERENCES: dict[tuple[str, str], str] = {
    ("3.0.1", "Client.__init__:rabbitmq_config"): (
        "3.0.1 refuses it (WebSocket only); we keep the AMQP transport, default None"
    ),
    ("3.0.1", "Client.__init__:use_websocket"): (
        "3.0.1 refuses it (WebSocket only); we keep both transports, default False as 2.9.0"
    ),
    ("*", "WebSocketConfig.max_reconnect_attempts"): (
        "the published code says 0 (forever); its README documents 10, which we keep"
    ),
    ("2.9.0", "RabbitMQConfig.max_reconnect_attempts"): (
        "the published code says 0 (forever); its README documents 10, which we keep"
    ),
    ("*", "Client.get_run_details->"): "returns the run details dict instead of None",
    ("*", "Client.consumer"): "a thread handle upstream; our consumer is private",
    ("*", "Client.ws_credentials"): "upstream's internal dict holding the session token",
    ("2.9.0", "Client.rabbit_credentials"): "upstream's internal dict holding the token",
    ("2.9.0", "get_metadata"): (
        "3.0.1 put kind where 2.9.0 had device_info; we follow 3.0.1 and refuse a dict "
        "there with a message naming device_info="
    ),
}


@dataclass
class Param:
    name: str
    kind: str  # "positional", "keyword_only", "var"
    default: Any = inspect.Parameter.empty


@dataclass
class Function:
    params: list[Param]
    returns: str | None
    decorators: list[str] = field(default_factory=list)


@dataclass
class Klass:
    is_dataclass: bool
    fields: list[Param]  # dataclass fields, in order
    methods: dict[str, Function]
    instance_attrs: set[str]


@dataclass
class Surface:
    exports: list[str]
    classes: dict[str, Klass]
    functions: dict[str, Function]
    constants: dict[str, Any]


# --------------------------------------------------------------------------- the wheels


@pytest.fixture(scope="session")
def wheels(request: pytest.FixtureRequest) -> dict[str, Path]:
    cache = Path(request.config.cache.mkdir("branchkey-wheels"))  # type: ignore[union-attr]
    found: dict[str, Path] = {}
    for version in VERSIONS:
        folder = cache / version
        existing = sorted(folder.glob(f"branchkey-{version}-*.whl"))
        if not existing:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", f"branchkey=={version}"]
                + ["--no-deps", "--only-binary", ":all:", "-d", str(folder), "-q"],
                capture_output=True,
                text=True,
                timeout=300,
            )
            existing = sorted(folder.glob(f"branchkey-{version}-*.whl"))
            if done.returncode != 0 or not existing:
                text = done.stderr + done.stdout
                if any(hint in text for hint in _NETWORK_HINTS):
                    pytest.skip(f"the package registry cannot be reached: {text.strip()[-300:]}")
                pytest.fail(f"pip download branchkey=={version} failed:\n{text}")
        found[version] = existing[-1]
    return found


def _literal(node: ast.expr | None, consts: dict[str, Any]) -> Any:
    if node is None:
        return inspect.Parameter.empty
    if isinstance(node, ast.Name) and node.id in consts:
        return consts[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return f"<{ast.unparse(node)}>"


def _function(node: ast.FunctionDef, consts: dict[str, Any]) -> Function:
    a = node.args
    positional = a.posonlyargs + a.args
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += list(a.defaults)
    params = [
        Param(p.arg, "positional", _literal(d, consts))
        for p, d in zip(positional, defaults, strict=True)
    ]
    if a.vararg:
        params.append(Param(a.vararg.arg, "var"))
    for p, d in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(Param(p.arg, "keyword_only", _literal(d, consts)))
    decorators = [ast.unparse(d) for d in node.decorator_list]
    if "staticmethod" not in decorators and params and params[0].name in ("self", "cls"):
        params = params[1:]
    return Function(params, ast.unparse(node.returns) if node.returns else None, decorators)


def _surface(wheel: Path) -> Surface:
    modules: dict[str, ast.Module] = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith("branchkey/") and name.endswith(".py"):
                modules[name] = ast.parse(zf.read(name).decode("utf-8"), filename=name)
    consts: dict[str, Any] = {}
    for tree in modules.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target = node.targets[0]
                if isinstance(target, ast.Name):
                    try:
                        consts[target.id] = ast.literal_eval(node.value)
                    except ValueError:
                        consts.setdefault(target.id, f"<{ast.unparse(node.value)}>")
    exports: list[str] = []
    for node in modules["branchkey/__init__.py"].body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            exports = list(ast.literal_eval(node.value))
    classes: dict[str, Klass] = {}
    functions: dict[str, Function] = {}
    for tree in modules.values():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                functions[node.name] = _function(node, consts)
            elif isinstance(node, ast.ClassDef):
                is_dc = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                fields = [
                    Param(item.target.id, "positional", _literal(item.value, consts))
                    for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
                ]
                methods = {
                    item.name: _function(item, consts)
                    for item in node.body
                    if isinstance(item, ast.FunctionDef)
                }
                attrs = {
                    t.attr
                    for item in node.body
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__"
                    for stmt in ast.walk(item)
                    if isinstance(stmt, ast.Assign)
                    for t in stmt.targets
                    if isinstance(t, ast.Attribute)
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                    and not t.attr.startswith("_")
                }
                classes[node.name] = Klass(is_dc, fields if is_dc else [], methods, attrs)
    return Surface(exports, classes, functions, consts)


@pytest.fixture(scope="session")
def surfaces(wheels: dict[str, Path]) -> dict[str, Surface]:
    return {v: _surface(p) for v, p in wheels.items()}


# --------------------------------------------------------------------------- comparison


def _allowed(version: str, key: str) -> bool:
    return (version, key) in DIFFERENCES or ("*", key) in DIFFERENCES


def _our_params(obj: Any) -> list[Param]:
    sig = inspect.signature(obj)
    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.KEYWORD_ONLY: "keyword_only",
        inspect.Parameter.VAR_POSITIONAL: "var",
        inspect.Parameter.VAR_KEYWORD: "var",
    }
    params = [Param(p.name, kinds[p.kind], p.default) for p in sig.parameters.values()]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return params


def _base(annotation: str) -> str:
    text = annotation.strip("'\"").replace("typing.", "").replace("Optional[", "").rstrip("]")
    return text.split("[", 1)[0].strip()


def _compare_function(
    version: str, key: str, theirs: Function, ours: Any, problems: list[str]
) -> None:
    mine = _our_params(ours)
    their_pos = [p for p in theirs.params if p.kind == "positional"]
    my_pos = [p for p in mine if p.kind == "positional"]
    if _allowed(version, key):
        return
    if [p.name for p in my_pos[: len(their_pos)]] != [p.name for p in their_pos]:
        problems.append(
            f"{key}: positional parameters {[p.name for p in my_pos]}, "
            f"published {[p.name for p in their_pos]}"
        )
        return
    for t, m in zip(their_pos, my_pos, strict=False):
        if t.default is inspect.Parameter.empty or _allowed(version, f"{key}:{t.name}"):
            continue
        if m.default is inspect.Parameter.empty or m.default != t.default:
            problems.append(f"{key}({t.name}=...): default {m.default!r}, published {t.default!r}")
    for extra in my_pos[len(their_pos) :]:
        if extra.default is inspect.Parameter.empty:
            problems.append(f"{key}: extra positional {extra.name} has no default")
    for t in theirs.params:
        if t.kind == "keyword_only" and t.name not in {p.name for p in mine}:
            problems.append(f"{key}: missing keyword {t.name}")
    if theirs.returns and not _allowed(version, f"{key}->"):
        ours_ret = inspect.signature(ours).return_annotation
        ours_text = ours_ret if isinstance(ours_ret, str) else getattr(ours_ret, "__name__", "")
        if _base(theirs.returns) != _base(str(ours_text)):
            problems.append(f"{key}: returns {ours_text}, published {theirs.returns}")


def _compare(version: str, surface: Surface) -> list[str]:
    problems: list[str] = []
    ours = bk_sim.client
    for name in surface.exports:
        if name not in ours.__all__:
            problems.append(f"export {name} is missing from bk_sim.client.__all__")
            continue
        obj = getattr(ours, name)
        if name in surface.classes:
            _compare_class(version, name, surface.classes[name], obj, problems)
        elif name in surface.functions:
            _compare_function(version, name, surface.functions[name], obj, problems)
        elif name in surface.constants and obj != surface.constants[name]:
            problems.append(f"{name} = {obj!r}, published {surface.constants[name]!r}")
    return problems


def _compare_class(version: str, name: str, theirs: Klass, ours: type, problems: list[str]) -> None:
    if theirs.is_dataclass:
        mine = [(f.name, f.default) for f in dataclasses.fields(ours)]
        if [n for n, _ in mine[: len(theirs.fields)]] != [f.name for f in theirs.fields]:
            problems.append(
                f"{name} fields {[n for n, _ in mine]}, published {[f.name for f in theirs.fields]}"
            )
        for t, (_, default) in zip(theirs.fields, mine, strict=False):
            if t.default is inspect.Parameter.empty or _allowed(version, f"{name}.{t.name}"):
                continue
            if default != t.default:
                problems.append(f"{name}.{t.name} defaults to {default!r}, published {t.default!r}")
        for n, default in mine[len(theirs.fields) :]:
            if default is dataclasses.MISSING:
                problems.append(f"{name}.{n}: an extra field without a default")
    for method, fn in theirs.methods.items():
        if method.startswith("_") and method not in ("__init__", "__enter__", "__exit__"):
            continue
        key = f"{name}.{method}"
        attr = inspect.getattr_static(ours, method, None)
        if attr is None:
            problems.append(f"{key} is missing")
        elif "property" in fn.decorators:
            if not isinstance(attr, property):
                problems.append(f"{key} is not a property")
            elif fn.returns and attr.fget is not None:
                got = str(inspect.signature(attr.fget).return_annotation)
                if _base(got) != _base(fn.returns):
                    problems.append(f"{key} property returns {got}, published {fn.returns}")
        else:
            if isinstance(attr, property):
                problems.append(f"{key} is a property, published a method")
                continue
            _compare_function(version, key, fn, getattr(ours, method), problems)
    for attr_name in sorted(theirs.instance_attrs):
        key = f"{name}.{attr_name}"
        if not _allowed(version, key) and inspect.getattr_static(ours, attr_name, None) is None:
            problems.append(f"{key} (an attribute set in __init__) is missing")


@pytest.mark.parametrize("version", VERSIONS)
def test_our_surface_covers_the_published_one(version: str, surfaces: dict[str, Surface]) -> None:
    surface = surfaces[version]
    assert "Client" in surface.exports and "Credentials" in surface.classes  # parsed at all
    assert _compare(version, surface) == []


def test_3_0_1_is_read_as_a_superset_of_2_9_0_except_transports(
    surfaces: dict[str, Surface],
) -> None:
    old, new = surfaces["2.9.0"], surfaces["3.0.1"]
    dropped = set(old.exports) - set(new.exports)
    assert dropped == {"RabbitMQConfig", "AGGREGATED_OUTPUT_DIR"}  # the transport change
    assert {"RabbitMQConfig", "AGGREGATED_OUTPUT_DIR"} <= set(bk_sim.client.__all__)
    assert set(old.exports) | set(new.exports) <= set(bk_sim.client.__all__)


def test_the_comparison_catches_a_swapped_field_order(surfaces: dict[str, Surface]) -> None:
    """The check itself can fail: the seed's (owner, tree, branch) order is reported."""

    @dataclasses.dataclass(frozen=True)
    class OldCredentials:
        id: str
        name: str
        session_token: str
        owner_id: str
        tree_id: str
        branch_id: str

    problems: list[str] = []
    _compare_class(
        "3.0.1", "Credentials", surfaces["3.0.1"].classes["Credentials"], OldCredentials, problems
    )
    assert problems and "fields" in problems[0]


def test_every_listed_difference_is_still_a_difference(
    surfaces: dict[str, Surface], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the list, each entry is reported; one that no longer differs must go."""
    monkeypatch.setattr(sys.modules[__name__], "DIFFERENCES", {})
    found = {v: _compare(v, surfaces[v]) for v in VERSIONS}
    for version, key in DIFFERENCES:
        if key.endswith("->"):
            needle = f"{key[:-2]}: returns"
        elif ":" in key:
            fn, param = key.split(":")
            needle = f"{fn}({param}=..."
        else:
            needle = key
        versions = VERSIONS if version == "*" else (version,)
        for v in versions:
            if version == "*" and not any(needle.split("(")[0] in p for p in found[v]):
                continue  # "*" entries need to differ in at least one release
            assert any(p.startswith(needle) for p in found[v]), f"{v} {key}: {found[v]}"
        assert any(any(p.startswith(needle) for p in found[v]) for v in versions), key
