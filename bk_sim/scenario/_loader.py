"""YAML (plus ``--set`` overrides) to one validated ``Scenario``.

Every problem becomes a ``ScenarioError`` whose one-line message says where (the file and
line, or the ``--set`` that caused it), the key path (``leaves.weighting.sigma``), what was
found and what was expected. Conversion is driven by the dataclasses' type hints and the
ranges in their field metadata (``_spec.py``), so the schema has one definition.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from bk_sim.errors import ScenarioError
from bk_sim.scenario._presets import PRESETS
from bk_sim.scenario._spec import (
    DISTRIBUTION_KEYS,
    DTYPES,
    LASTING_CHAOS,
    OWN_IMPLEMENTATION,
    PROXY_CHAOS,
    ChaosFaultSpec,
    FaultsSpec,
    LayerSpec,
    ModelSpec,
    PlatformSpec,
    Scenario,
    WeightingSpec,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: A published-client requirement names the branchkey distribution first; the full check
#: (specifier, no URL, no marker) is bk_sim.published's, before any env is built.
_PUBLISHED_RE = re.compile(r"^\s*branchkey(\s*[\[(<>=!~;@]|\s*$)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Problem(Exception):
    """A schema problem at ``path``; the loader adds where it came from."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# --------------------------------------------------------------------------- public


def load_scenario(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Read, override and validate a scenario file; raises ``ScenarioError``."""
    source = Path(path)
    if not source.exists():
        raise ScenarioError(f"{source}: no such scenario file")
    if source.is_dir():
        raise ScenarioError(f"{source}: is a folder, expected a scenario .yaml file")
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: cannot read: {exc}") from exc
    data, lines = _parse_yaml(text, str(source))
    if data is None:
        raise ScenarioError(f"{source}: the file is empty; expected a scenario mapping")
    return _from_data(data, source=source, overrides=overrides, lines=lines)


def scenario_from_dict(
    data: Mapping[str, Any],
    *,
    source: Path | None = None,
    overrides: Sequence[str] = (),
) -> Scenario:
    """The same validation for a scenario built in code (tests, other drivers)."""
    return _from_data(data, source=source, overrides=overrides, lines={})


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"leaves.count=20"`` -> (("leaves", "count"), 20); the value is parsed as YAML."""
    key, sep, value_text = text.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"--set {text}: expected key.path=value, e.g. leaves.count=20")
    parts = tuple(p.strip() for p in key.strip().split("."))
    if any(not p for p in parts):
        raise ScenarioError(f"--set {text}: empty key in path {key.strip()!r}")
    try:
        _check_schema_path(parts)
    except _Problem as exc:
        raise ScenarioError(f"--set {text}: {exc}") from None
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ScenarioError(f"--set {text}: the value is not valid YAML: {exc}") from exc
    return parts, value


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, typing.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, where: str) -> tuple[Any, dict[str, int]]:
    """The document and the 1-based line of every key path in it."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = exc.problem or exc.context or "syntax error"
        context = ""
        if exc.context and exc.context_mark is not None and exc.problem:
            context = f" ({exc.context} started at line {exc.context_mark.line + 1})"
        raise ScenarioError(f"{where}{at}: invalid YAML: {problem}{context}") from exc
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{where}: invalid YAML: {exc}") from exc
    finally:
        loader.dispose()
    lines: dict[str, int] = {}
    if node is not None:
        _index_lines(node, "", lines, set())
    return data, lines


def _index_lines(node: yaml.Node, prefix: str, out: dict[str, int], seen: set[int]) -> None:
    """Each collection node is walked once: an alias (``*a``) may point back at its own
    anchor (a cycle) or be repeated into exponentially many paths (a "billion laughs")."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        if id(node) in seen:
            return
        seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = _join(prefix, str(key_node.value))
                out[path] = key_node.start_mark.line + 1
                _index_lines(value_node, path, out, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            path = f"{prefix}[{i}]"
            out[path] = item.start_mark.line + 1
            _index_lines(item, path, out, seen)


# --------------------------------------------------------------------------- assembly


def _from_data(
    data: Any,
    *,
    source: Path | None,
    overrides: Sequence[str],
    lines: Mapping[str, int],
) -> Scenario:
    where = str(source) if source is not None else "scenario"
    if not isinstance(data, Mapping):
        raise ScenarioError(
            f"{where}: expected a mapping of scenario keys at the top level, found "
            f"{_describe(data)}"
        )
    merged: dict[str, Any] = _copy(data, where)
    applied: list[tuple[str, str]] = []  # (key path, override text)
    for text in overrides:
        try:
            parts, value = parse_override(text)
            _set_path(merged, parts, value, text)
        except ScenarioError as exc:
            raise ScenarioError(f"{where}: {exc}") from exc.__cause__
        applied.append((".".join(parts), text))
    if "name" not in merged and source is not None:
        merged["name"] = source.stem
    payload = merged.get("payload")
    if isinstance(payload, Mapping) and payload.get("kind") == "federated_analytics":
        merged.setdefault("model", {"preset": "tiny"})  # FA: no model is trained
    try:
        scenario = _build(Scenario, merged, "")
        scenario = _resolve_files(scenario, source)
        _check_scenario(scenario)
    except _Problem as exc:
        raise ScenarioError(_locate(exc, where, lines, applied)) from None
    return dataclasses.replace(scenario, source=source)


def _locate(
    exc: _Problem, where: str, lines: Mapping[str, int], applied: Sequence[tuple[str, str]]
) -> str:
    """``file:line: path: message``, or ``file (--set x=y): path: message``."""
    for key, text in reversed(applied):
        if _related(key, exc.path):
            return f"{where} (--set {text}): {exc}"
    probe = exc.path
    while probe:
        if probe in lines:
            return f"{where}:{lines[probe]}: {exc}"
        probe = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", probe) if ("." in probe or "[" in probe) else ""
    return f"{where}: {exc}"


def _related(a: str, b: str) -> bool:
    def under(x: str, y: str) -> bool:
        return x == y or x.startswith(y + ".") or x.startswith(y + "[")

    return under(a, b) or under(b, a)


#: More values than any real scenario holds; YAML aliases can multiply a small file.
_MAX_VALUES = 100_000


def _copy(data: Any, where: str) -> Any:
    """A deep copy of plain data, refusing a cycle (``x: &a [*a]``) or an alias-built
    explosion ("billion laughs") with a ScenarioError instead of a RecursionError or a hang."""
    budget = _MAX_VALUES

    def walk(value: Any, ancestors: frozenset[int]) -> Any:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ScenarioError(
                f"{where}: more than {_MAX_VALUES:,} values (YAML aliases repeated?)"
            )
        if not isinstance(value, (Mapping, list)):
            return value
        if id(value) in ancestors:
            raise ScenarioError(f"{where}: a YAML alias refers to a value that contains it")
        inner = ancestors | {id(value)}
        if isinstance(value, Mapping):
            return {k: walk(v, inner) for k, v in value.items()}
        return [walk(v, inner) for v in value]

    return walk(data, frozenset())


def _set_path(data: dict[str, Any], parts: tuple[str, ...], value: Any, text: str) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            at = ".".join(parts[: i + 1])
            raise ScenarioError(
                f"--set {text}: {at} is {_describe(child)} in the file, not a mapping"
            )
        node = child
    node[parts[-1]] = value
    # A model is a preset or explicit layers: setting one replaces the other.
    if parts == ("model", "preset"):
        node.pop("layers", None)
    elif parts == ("model", "layers"):
        node.pop("preset", None)


def _check_schema_path(parts: Sequence[str]) -> None:
    """Every key of an override path exists (with a suggestion when one does not)."""
    cls: Any = Scenario
    for i, part in enumerate(parts):
        path = ".".join(parts[:i])
        names = _field_names(cls)
        if part not in names:
            raise _Problem(_join(path, part), _unknown(part, names, path))
        hint = _inner(_hints(cls)[part])
        if i + 1 < len(parts):
            if not (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
                raise _Problem(
                    _join(path, part),
                    f"is {_type_name(_hints(cls)[part])}, it has no key {parts[i + 1]!r}",
                )
            cls = hint


# --------------------------------------------------------------------------- conversion


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _inner(tp: Any) -> Any:
    """``X | None`` -> X; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _unknown(key: Any, names: Sequence[str], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
    hint = f"; did you mean {_join(prefix, close[0])!r}?" if close else ""
    where = f"under {prefix!r}" if prefix else "at the top level"
    return f"unknown key {key!r} {where}{hint} (expected one of: {', '.join(names)})"


def _build(cls: type, raw: Any, path: str) -> Any:
    if cls is ModelSpec:
        return _build_model(raw, path)
    names = _field_names(cls)
    if not isinstance(raw, Mapping):
        raise _Problem(
            path, f"expected a mapping with keys {', '.join(names)}; found {_describe(raw)}"
        )
    for key in raw:
        if key not in names:
            raise _Problem(_join(path, str(key)), _unknown(key, names, path))
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in names:
            continue
        sub = _join(path, f.name)
        if f.name in raw:
            value = _convert(hints[f.name], raw[f.name], sub)
            _check_range(f, value, sub)
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _Problem(sub, f"is required ({f.metadata.get('doc', '')}) but missing")
    if cls is WeightingSpec:
        _check_weighting_keys(raw, path)
    obj = cls(**kwargs)
    _CLASS_CHECKS.get(cls, _no_check)(obj, path)
    return obj


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(_inner(tp), value, path)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, str):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Problem(
            path, f"expected one of {', '.join(map(str, choices))}; found {_describe(value)}{hint}"
        )
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise _Problem(path, f"expected {_type_name(tp)}; found {_describe(value)}")
        out: dict[Any, Any] = {}
        for key, item in value.items():
            if key_tp is str and not isinstance(key, str):
                raise _Problem(path, f"expected string keys; found {_describe(key)}")
            out[key] = _convert(item_tp, item, _join(path, str(key)))
        return out
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise _Problem(path, f"expected {_type_name(tp)}; found {_describe(value)}")
        return tuple(_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            if not math.isfinite(number):
                raise _Problem(path, f"expected a finite number; found {_describe(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    raise _Problem(path, f"expected {_type_name(tp)}; found {_describe(value)}")


def _as_float(value: Any) -> float | None:
    """Numbers, and numeric strings: PyYAML reads ``1e-6`` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    return None


def _check_range(f: dataclasses.Field[Any], value: Any, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    meta = f.metadata
    kind = "an integer" if isinstance(value, int) else "a number"
    for key, ok in _RANGE_TESTS.items():
        if key in meta and not ok(value, meta[key]):
            raise _Problem(path, f"expected {kind} {_range_text(meta)}; found {value!r}")


_RANGE_TESTS: dict[str, Any] = {
    "ge": lambda v, b: v >= b,
    "gt": lambda v, b: v > b,
    "le": lambda v, b: v <= b,
    "lt": lambda v, b: v < b,
}


def _range_text(meta: Mapping[str, Any]) -> str:
    lo = (">=", meta["ge"]) if "ge" in meta else (">", meta["gt"]) if "gt" in meta else None
    hi = ("<=", meta["le"]) if "le" in meta else ("<", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        left = "[" if lo[0] == ">=" else "("
        right = "]" if hi[0] == "<=" else ")"
        return f"in {left}{lo[1]}, {hi[1]}{right}"
    bound = lo or hi
    return f"{bound[0]} {bound[1]}" if bound else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin is dict:
        item = typing.get_args(tp)[1]
        plural = {int: "integers", float: "numbers", str: "strings"}.get(item, "values")
        return f"a mapping of names to {plural}"
    if origin is tuple:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings"}.get(item, "mappings")
        return f"a list of {plural}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return "a mapping"
    return {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path (string)",
    }.get(tp, str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, int):
        return f"{value} (an integer)"
    if isinstance(value, float):
        return f"{value!r} (a number)"
    if isinstance(value, str):
        return f"{value!r} (a string)" if value else "an empty string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


# --------------------------------------------------------------------------- checks


def _no_check(obj: Any, path: str) -> None:
    return None


def _check_weighting_keys(raw: Mapping[str, Any], path: str) -> None:
    dist = raw.get("distribution", "fixed")
    allowed = DISTRIBUTION_KEYS.get(dist, ())
    for key in raw:
        if key != "distribution" and key not in allowed:
            raise _Problem(
                _join(path, str(key)),
                f"does not apply to distribution {dist!r}; it takes only "
                f"{', '.join(allowed) or 'nothing'}",
            )
    if dist == "list" and "values" not in raw:
        raise _Problem(_join(path, "values"), "is required for distribution 'list' but missing")


def _check_weighting(w: WeightingSpec, path: str) -> None:
    if w.distribution == "uniform" and w.high < w.low:
        raise _Problem(_join(path, "high"), f"expected a number >= low ({w.low}); found {w.high}")
    if w.distribution == "list":
        for i, v in enumerate(w.values):
            if v <= 0:
                raise _Problem(f"{path}.values[{i}]", f"expected a number > 0; found {v!r}")


def _check_layer(layer: LayerSpec, path: str) -> None:
    for i, d in enumerate(layer.shape):
        if d < 1:
            raise _Problem(f"{path}.shape[{i}]", f"expected an integer >= 1; found {d}")
    if layer.dtype not in DTYPES:
        close = difflib.get_close_matches(layer.dtype, DTYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Problem(
            _join(path, "dtype"),
            f"expected one of {', '.join(DTYPES)}; found {layer.dtype!r}{hint}",
        )


def _check_faults(faults: FaultsSpec, path: str) -> None:
    for i, rule in enumerate(faults.http):
        if rule.status is None and not (rule.reset or rule.drop_response or rule.latency_s > 0):
            raise _Problem(
                f"{path}.http[{i}]",
                "does nothing: expected at least one of status, reset, drop_response, latency_s",
            )


def _check_platform(p: PlatformSpec, path: str) -> None:
    if p.mode == "remote":
        for key in ("host", "credentials_file"):
            if getattr(p, key) is None:
                raise _Problem(_join(path, key), "is required when platform.mode is 'remote'")
        if _faults_set(p.faults) and p.admin_url is None:
            raise _Problem(
                _join(path, "faults"),
                "need platform.admin_url in remote mode (faults go through the admin API)",
            )
    else:
        for key in ("host", "credentials_file", "admin_url", "admin_token"):
            if getattr(p, key) is not None:
                raise _Problem(
                    _join(path, key),
                    "applies only to platform.mode 'remote' (local mode starts its own platform)",
                )
    if p.tls and p.mode != "local":
        raise _Problem(
            _join(path, "tls"),
            "applies to the local platform (a remote https:// host is verified against the "
            "leaves' CA bundle: REQUESTS_CA_BUNDLE / SSL_CERT_FILE)",
        )
    if p.quorum is not None and p.round_timeout_s is None:
        raise _Problem(
            _join(path, "quorum"),
            "has no effect without platform.round_timeout_s (a round closes on quorum only "
            "when its timeout passes)",
        )


def _check_payload_kind(s: Scenario) -> None:
    """Federated analytics: faults and settings of the right kind only."""
    fa = s.payload.kind == "federated_analytics"
    if fa and s.platform.faults.aggregation is not None:
        raise _Problem(
            "platform.faults.aggregation",
            "applies to federated_learning rounds; use platform.faults.analytics",
        )
    if not fa and s.platform.faults.analytics is not None:
        raise _Problem(
            "platform.faults.analytics", "applies only to payload.kind 'federated_analytics'"
        )
    t = s.payload.tabular
    if not t.rows_min <= t.rows_median <= t.rows_max:
        raise _Problem("payload.tabular", "expected rows_min <= rows_median <= rows_max")


def _faults_set(f: FaultsSpec) -> bool:
    return f != FaultsSpec()


def _check_chaos_fault(f: ChaosFaultSpec, path: str) -> None:
    if (f.at_s is None) == (f.round is None):
        raise _Problem(path, "give exactly one of at_s (seconds) or round (with when)")
    if f.kind in LASTING_CHAOS and f.duration_s is None:
        raise _Problem(_join(path, "duration_s"), f"is required for kind {f.kind!r}")
    if f.kind not in LASTING_CHAOS and f.duration_s is not None:
        raise _Problem(
            _join(path, "duration_s"), f"does not apply to kind {f.kind!r} (it is instantaneous)"
        )
    if (f.kind == "http") != (f.http is not None):
        raise _Problem(_join(path, "http"), "is required for kind 'http' and only for it")
    if f.kind == "latency" and f.latency_s + f.jitter_s <= 0:
        raise _Problem(_join(path, "latency_s"), "expected latency_s or jitter_s > 0")
    if f.kind == "bandwidth" and f.bandwidth_kbps is None:
        raise _Problem(_join(path, "bandwidth_kbps"), "is required for kind 'bandwidth'")
    if f.restart and f.kind != "kill_leaf":
        raise _Problem(_join(path, "restart"), "applies only to kind 'kill_leaf'")


_CLASS_CHECKS: dict[type, Any] = {
    ChaosFaultSpec: _check_chaos_fault,
    WeightingSpec: _check_weighting,
    LayerSpec: _check_layer,
    FaultsSpec: _check_faults,
    PlatformSpec: _check_platform,
}


def _build_model(raw: Any, path: str) -> ModelSpec:
    names = ["preset", "layers"]
    if not isinstance(raw, Mapping):
        raise _Problem(path, f"expected a mapping with preset or layers; found {_describe(raw)}")
    for key in raw:
        if key not in names:
            raise _Problem(_join(path, str(key)), _unknown(key, names, path))
    if "preset" in raw and "layers" in raw:
        raise _Problem(path, "give either model.preset or model.layers, not both")
    if "preset" in raw:
        name = raw["preset"]
        if not isinstance(name, str) or name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise _Problem(
                _join(path, "preset"),
                f"expected one of {', '.join(PRESETS)}; found {_describe(name)}{hint}",
            )
        layers = tuple(LayerSpec(shape=s, dtype=d) for s, d in PRESETS[name])
        return ModelSpec(layers=layers, preset=name)
    if "layers" in raw:
        layers = _convert(tuple[LayerSpec, ...], raw["layers"], _join(path, "layers"))
        if not layers:
            raise _Problem(
                _join(path, "layers"), "expected at least one layer; found an empty list"
            )
        return ModelSpec(layers=layers)
    raise _Problem(path, "expected model.preset (a named model) or model.layers; found neither")


def _resolve_files(s: Scenario, source: Path | None) -> Scenario:
    """Make ``credentials_file`` relative to the scenario file, and check it early."""
    cf = s.platform.credentials_file
    if cf is None:
        return s
    if not cf.is_absolute() and source is not None:
        cf = source.parent / cf
    path = "platform.credentials_file"
    try:
        creds = json.loads(cf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Problem(path, f"no such file {str(cf)!r}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Problem(path, f"{str(cf)!r} is not a readable JSON file: {exc}") from None
    if not isinstance(creds, list) or not all(isinstance(c, dict) for c in creds):
        raise _Problem(path, f"{str(cf)!r}: expected a JSON list of credential objects")
    if len(creds) < s.leaves.count:
        raise _Problem(
            path,
            f"{str(cf)!r} holds {len(creds)} credentials; expected at least leaves.count "
            f"({s.leaves.count})",
        )
    return dataclasses.replace(s, platform=dataclasses.replace(s.platform, credentials_file=cf))


def _check_scenario(s: Scenario) -> None:
    """Checks that span sections (they need leaves.count, transport...)."""
    if not _NAME_RE.match(s.name):
        raise _Problem("name", f"expected letters, digits, '_', '.' or '-' only; found {s.name!r}")
    count = s.leaves.count
    if s.leaves.processes is not None and s.leaves.processes > count:
        raise _Problem(
            "leaves.processes",
            f"expected at most leaves.count ({count}); found {s.leaves.processes}",
        )
    if s.platform.tls and s.leaves.host != "threads":
        # The event-loop host's shared AMQP loop is not wired for the run's CA yet.
        raise _Problem(
            "platform.tls",
            f"needs leaves.host 'threads' (TLS runs are not ported to {s.leaves.host!r})",
        )
    published = {s.client.implementation, *(s.leaves.implementations or {})} - {OWN_IMPLEMENTATION}
    if s.platform.tls and published:
        # A published client's leaf processes are not given the run's CA yet.
        raise _Problem(
            "platform.tls",
            f"needs bk-sim's own client (TLS runs are not ported to {sorted(published)[0]!r})",
        )
    if s.platform.quorum is not None and s.platform.quorum > count:
        raise _Problem(
            "platform.quorum", f"expected at most leaves.count ({count}); found {s.platform.quorum}"
        )
    w = s.leaves.weighting
    if w.distribution == "list" and len(w.values) != count:
        raise _Problem(
            "leaves.weighting.values",
            f"expected one value per leaf ({count}); found {len(w.values)}",
        )
    if s.transport == "amqp" and s.broker.provider == "none":
        raise _Problem(
            "broker.provider",
            "is 'none' but transport is 'amqp'; use transport 'websocket' or another provider",
        )
    if s.broker.provider == "external" and s.broker.amqp_url is None:
        raise _Problem("broker.amqp_url", "is required when broker.provider is 'external'")
    d = s.leaves.dropouts
    if (d.skip_fraction > 0 or d.die_fraction > 0) and s.platform.mode == "local":
        if s.platform.round_timeout_s is None:
            raise _Problem(
                "leaves.dropouts",
                "needs platform.round_timeout_s (and a quorum): a round missing an upload "
                "never closes otherwise",
            )
    _check_payload_kind(s)
    _check_implementations(s)
    _check_chaos(s)


def _check_implementation_name(value: str, path: str) -> None:
    if value == OWN_IMPLEMENTATION or _PUBLISHED_RE.match(value):
        return
    raise _Problem(
        path,
        f"expected {OWN_IMPLEMENTATION!r} or a pip requirement of the published client "
        f"(e.g. 'branchkey==2.9.0', 'branchkey>=3'); found {_describe(value)}",
    )


def _check_implementations(s: Scenario) -> None:
    """``client.implementation`` and the mixed fleet's ``leaves.implementations``."""
    _check_implementation_name(s.client.implementation, "client.implementation")
    mix = s.leaves.implementations
    if mix is None:
        return
    path = "leaves.implementations"
    if not mix:
        raise _Problem(path, "expected at least one implementation; found an empty mapping")
    if s.client.implementation != OWN_IMPLEMENTATION:
        raise _Problem(
            path,
            f"and client.implementation ({s.client.implementation!r}) both say which client "
            "the leaves run: give one",
        )
    for name, fraction in mix.items():
        _check_implementation_name(name, _join(path, name))
        if not 0.0 < fraction <= 1.0:
            raise _Problem(_join(path, name), f"expected a fraction in (0, 1]; found {fraction!r}")
    total = sum(mix.values())
    if abs(total - 1.0) > 1e-6:
        raise _Problem(path, f"expected fractions that sum to 1; they sum to {total:g}")


def _check_chaos(s: Scenario) -> None:
    """Chaos faults against the rest of the scenario (rounds, broker, transport)."""
    for i, f in enumerate(s.chaos.faults):
        path = f"chaos.faults[{i}]"
        if f.round is not None and f.round > s.rounds:
            raise _Problem(
                _join(path, "round"), f"expected at most rounds ({s.rounds}); found {f.round}"
            )
        if f.kind == "restart_broker" and not s.chaos.broker_restartable:
            raise _Problem(
                _join(path, "kind"),
                "restart_broker stops the broker for everyone using it: set "
                "chaos.broker_restartable: true only for a broker that is this run's own",
            )
        needs_amqp = f.kind in PROXY_CHAOS or f.kind in (
            "kill_connections",
            "close_channel",
            "restart_broker",
        )
        if needs_amqp and (s.transport != "amqp" or s.platform.mode != "local"):
            raise _Problem(
                _join(path, "kind"),
                f"{f.kind!r} needs transport 'amqp' and platform.mode 'local'",
            )
        if f.kind in ("http", "kill_platform") and s.platform.mode != "local":
            raise _Problem(_join(path, "kind"), f"{f.kind!r} faults need platform.mode 'local'")
        if f.kind == "kill_leaf" and s.platform.round_timeout_s is None:
            raise _Problem(
                _join(path, "kind"),
                "kill_leaf leaves a round short of uploads: it needs platform.round_timeout_s "
                "(and a quorum) so the round closes without the killed leaves",
            )
