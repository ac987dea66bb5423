"""Federated analytics on the reference platform (FEDERATED-ANALYTICS.md, docs/analytics.md).

An FA upload holds named fields a site has already reduced its records to. This module
reads such archives itself (numpy, ``allow_pickle=False``; the platform never imports the
client), checks them, freezes the run's field schema, combines a round field by field and
derives the statistics of every analytics bundle. Every refusal is an ``AnalyticsRefusal``
whose message starts with its reason code, so a client sees ``shape_mismatch: ...``.

Arithmetic. Integer and bool ``sum`` fields are added exactly in int64 (uint64 for
unsigned fields) with overflow detection: an overflow fails the round naming the field,
it never wraps. Float fields are combined in float64 and stored in the field's dtype;
complex in complex128. ``min``/``max`` are exact in the field's own dtype.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bk_sim.errors import PlatformError
from bk_sim.files import atomic_write

__all__ = [
    "ANALYTICS_FAULTS",
    "BUNDLE_SUFFIXES",
    "FEDERATED_ANALYTICS",
    "FEDERATED_LEARNING",
    "FIELD_OPS",
    "PAYLOAD_KIND_KEY",
    "AnalyticsRefusal",
    "FieldsInfo",
    "aggregate_to_file",
    "check_field_ops",
    "check_upload",
    "combine",
    "default_op",
    "derived_stats",
    "encode_aggregate",
    "freeze_schema",
    "metadata_kind",
    "must_match_reference",
    "read_fields",
    "upload_kind",
    "validate_fields",
]

PAYLOAD_KIND_KEY = "__bk_payload_kind__"
FEDERATED_LEARNING = "federated_learning"
FEDERATED_ANALYTICS = "federated_analytics"
PAYLOAD_KINDS = (FEDERATED_LEARNING, FEDERATED_ANALYTICS)
WEIGHTING_KEY = "weighting"
RESERVED_NAMES = frozenset({WEIGHTING_KEY, PAYLOAD_KIND_KEY})
FIELD_OPS: tuple[str, ...] = ("sum", "min", "max", "must_match")
#: Bundle suffix -> its operation, longest suffix first (``_sumsq`` before ``_sum``).
BUNDLE_OPS: dict[str, str] = {
    "sumsq": "sum",
    "sum": "sum",
    "min": "min",
    "max": "max",
    "nan": "sum",
    "n": "sum",
}
BUNDLE_SUFFIXES: tuple[str, ...] = ("n", "sum", "sumsq", "min", "max", "nan")
ANALYTICS_FAULTS: tuple[str, ...] = ("mean_of_means", "drop_leaf", "nan_poisoned", "double_count")
_POSITIONAL_RE = re.compile(r"^layer_\d+$")
_ALLOWED_KINDS = frozenset("biufcUS")
_KIND_MEMBER = PAYLOAD_KIND_KEY + ".npy"
_MAX_KIND_MEMBER = 4096


class AnalyticsRefusal(PlatformError):
    """An FA upload or round the platform refuses; ``str()`` is ``"<code>: <reason>"``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


@dataclass(frozen=True)
class FieldSpec:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class FieldsInfo:
    """What validation learned about an FA archive; ``values`` are its fields' arrays."""

    fields: dict[str, FieldSpec]
    values: dict[str, np.ndarray]
    weighting: float = 0.0  # never read on the FA path; recorded as the upload's weighting


# --------------------------------------------------------------------------- kinds


def metadata_kind(form: Any) -> str | None:
    """The ``kind`` the upload's metadata declares, or None when it declares none.

    ``form`` is the parsed ``data`` form field: ``{"leaf_name", "metadata": "<JSON>"}``.
    Metadata that is not JSON declares nothing (the platform never required metadata);
    a ``kind`` that is not one of the two kinds is refused.
    """
    if not isinstance(form, Mapping):
        return None
    meta = form.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return None
    if not isinstance(meta, Mapping) or meta.get("kind") is None:
        return None
    kind = meta["kind"]
    if kind not in PAYLOAD_KINDS:
        raise AnalyticsRefusal(
            "unknown_kind",
            f"metadata kind {kind!r} is not one of {', '.join(PAYLOAD_KINDS)}",
        )
    return str(kind)


def _archive_kind(data: bytes | Path) -> str:
    """The kind an archive declares under ``__bk_payload_kind__`` (none: FL)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data) as zf:
            try:
                info = zf.getinfo(_KIND_MEMBER)
            except KeyError:
                return FEDERATED_LEARNING
            if info.file_size > _MAX_KIND_MEMBER:
                raise AnalyticsRefusal("invalid_archive", f"{PAYLOAD_KIND_KEY} is too large")
            with zf.open(info) as member:
                arr = np.lib.format.read_array(member, allow_pickle=False)
    except AnalyticsRefusal:
        raise
    except (RuntimeError, NotImplementedError) as exc:  # encrypted or unknown compression
        raise AnalyticsRefusal("invalid_archive", f"{PAYLOAD_KIND_KEY}: {exc}") from exc
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        # Not our problem to word: the regular validation says what is wrong with it.
        if isinstance(exc, zipfile.BadZipFile):
            return FEDERATED_LEARNING
        raise AnalyticsRefusal("invalid_archive", f"{PAYLOAD_KIND_KEY}: {exc}") from exc
    if arr.dtype.kind != "U" or arr.size != 1:
        raise AnalyticsRefusal(
            "invalid_archive", f"{PAYLOAD_KIND_KEY} must be a unicode string, got {arr.dtype}"
        )
    kind = str(arr.reshape(-1)[0])
    if kind not in PAYLOAD_KINDS:
        raise AnalyticsRefusal(
            "unknown_kind", f"archive kind {kind!r} is not one of {', '.join(PAYLOAD_KINDS)}"
        )
    return kind


def upload_kind(data: bytes | Path, declared: str | None) -> str:
    """The upload's kind; archive and metadata disagreeing is ``kind_mismatch``."""
    kind = _archive_kind(data)
    if declared is not None and declared != kind:
        raise AnalyticsRefusal(
            "kind_mismatch",
            f"the archive declares {kind!r} but the upload metadata says {declared!r}",
        )
    return kind


# --------------------------------------------------------------------------- archives


def read_fields(source: bytes | Path, max_decompressed_bytes: int | None) -> dict[str, np.ndarray]:
    """Every array of an archive, loaded without pickle; ``invalid_archive`` otherwise."""
    fileobj: io.BytesIO | Path = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with zipfile.ZipFile(fileobj) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if max_decompressed_bytes is not None and total > max_decompressed_bytes:
                raise AnalyticsRefusal(
                    "invalid_archive",
                    f"decompresses to {total} bytes, over the limit of {max_decompressed_bytes}",
                )
            arrays: dict[str, np.ndarray] = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise AnalyticsRefusal(
                        "invalid_archive", f"member {info.filename!r} is not .npy"
                    )
                with zf.open(info) as member:
                    arrays[info.filename[: -len(".npy")]] = np.lib.format.read_array(
                        member, allow_pickle=False
                    )
            return arrays
    except AnalyticsRefusal:
        raise
    except zipfile.BadZipFile as exc:
        raise AnalyticsRefusal("invalid_archive", f"not an .npz (ZIP) archive: {exc}") from exc
    except ValueError as exc:  # pickled object arrays with allow_pickle=False
        raise AnalyticsRefusal("invalid_archive", f"cannot load without pickle: {exc}") from exc
    except (OSError, EOFError, MemoryError) as exc:
        raise AnalyticsRefusal("invalid_archive", f"truncated or corrupt archive: {exc}") from exc
    except (RuntimeError, NotImplementedError) as exc:  # encrypted or unknown compression
        raise AnalyticsRefusal("invalid_archive", f"unreadable member: {exc}") from exc


def _native(dtype: np.dtype[Any]) -> str:
    return dtype.newbyteorder("=").str


def validate_fields(data: bytes | Path, max_decompressed_bytes: int | None) -> FieldsInfo:
    """Check an FA archive on its own (the archive checks of the contract)."""
    arrays = read_fields(data, max_decompressed_bytes)
    w = arrays.get(WEIGHTING_KEY)
    if w is None:
        raise AnalyticsRefusal("missing_weighting", "the reserved 'weighting' array is absent")
    if w.size != 1 or w.dtype.kind not in "biuf":
        raise AnalyticsRefusal(
            "invalid_weighting", f"'weighting' must be one number, got {w.size} of {w.dtype}"
        )
    names = sorted(k for k in arrays if k not in RESERVED_NAMES)
    if not names:
        raise AnalyticsRefusal("no_fields", "the archive holds no named fields")
    fields: dict[str, FieldSpec] = {}
    values: dict[str, np.ndarray] = {}
    for name in names:
        arr = arrays[name]
        if _POSITIONAL_RE.match(name):
            raise AnalyticsRefusal(
                "positional_field",
                f"field {name!r} uses the positional layer_<n> namespace of model weights",
            )
        if arr.ndim == 0:
            raise AnalyticsRefusal(
                "scalar_field", f"field {name!r} is 0-d; a single value is a 1-element array"
            )
        if arr.dtype.kind not in _ALLOWED_KINDS:
            raise AnalyticsRefusal(
                "unsupported_dtype", f"field {name!r} has dtype {arr.dtype}, which is not allowed"
            )
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise AnalyticsRefusal("non_finite", f"field {name!r} holds NaN or infinite values")
        fields[name] = FieldSpec(_native(arr.dtype), tuple(int(s) for s in arr.shape))
        values[name] = arr
    return FieldsInfo(fields=fields, values=values)


# --------------------------------------------------------------------------- operations


def default_op(name: str) -> str | None:
    """The operation a bundle suffix implies (``age_sumsq`` -> sum), else None."""
    for suffix, op in BUNDLE_OPS.items():
        if name.endswith("_" + suffix) and len(name) > len(suffix) + 1:
            return op
    return None


def check_field_ops(raw: Any) -> dict[str, str]:
    """A branch's ``field_ops`` config; ``ValueError`` naming the bad entry."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError("field_ops must be a JSON object {field name: operation}")
    out: dict[str, str] = {}
    for name, op in raw.items():
        if not isinstance(name, str) or not name:
            raise ValueError("field_ops names must be non-empty strings")
        if name in RESERVED_NAMES or _POSITIONAL_RE.match(name):
            raise ValueError(f"field_ops: {name!r} is a reserved name, not a field")
        if op not in FIELD_OPS:
            raise ValueError(f"field_ops[{name!r}] must be one of {', '.join(FIELD_OPS)}")
        out[name] = str(op)
    return out


def _op_fits(op: str, dtype_kind: str) -> bool:
    if op == "must_match":
        return True
    if dtype_kind in "US":
        return False
    return not (op in ("min", "max") and dtype_kind == "c")


def freeze_schema(info: FieldsInfo, field_ops: Mapping[str, str]) -> dict[str, Any]:
    """The run's schema from its first FA upload: each field's dtype, shape and operation."""
    schema: dict[str, Any] = {}
    for name, spec in info.fields.items():
        op = field_ops.get(name) or default_op(name)
        if op is None:
            raise AnalyticsRefusal(
                "unassigned_field",
                f"field {name!r} has no operation; set one in the branch's field_ops",
            )
        if not _op_fits(op, np.dtype(spec.dtype).kind):
            raise AnalyticsRefusal(
                "invalid_operation", f"field {name!r}: {op} is not defined for dtype {spec.dtype}"
            )
        schema[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "op": op}
    return schema


def check_upload(
    schema: Mapping[str, Any], info: FieldsInfo, reference: Mapping[str, Any] | None
) -> None:
    """An FA upload against the run's frozen schema and the round's must_match values."""
    missing = sorted(set(schema) - set(info.fields))
    if missing:
        raise AnalyticsRefusal(
            "field_missing",
            f"field {missing[0]!r} of the run's schema is absent"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
        )
    extra = sorted(set(info.fields) - set(schema))
    if extra:
        raise AnalyticsRefusal(
            "unexpected_field",
            f"field {extra[0]!r} is not in the run's schema"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""),
        )
    for name, spec in info.fields.items():
        frozen = schema[name]
        if spec.dtype != frozen["dtype"]:
            raise AnalyticsRefusal(
                "dtype_mismatch",
                f"field {name!r} has dtype {spec.dtype}; the run's schema has {frozen['dtype']}",
            )
        if list(spec.shape) != list(frozen["shape"]):
            raise AnalyticsRefusal(
                "shape_mismatch",
                f"field {name!r} has shape {spec.shape}; the run's schema has "
                f"{tuple(frozen['shape'])}",
            )
    if reference:
        for name, ref in reference.items():
            if not np.array_equal(info.values[name], _from_json(ref)):
                raise AnalyticsRefusal(
                    "must_match",
                    f"field {name!r} differs from the value this round's first upload sent",
                )


def must_match_reference(schema: Mapping[str, Any], info: FieldsInfo) -> dict[str, Any]:
    """The round's must_match values, taken from its first upload (JSON-safe)."""
    return {
        name: _to_json(info.values[name])
        for name, frozen in schema.items()
        if frozen["op"] == "must_match"
    }


def _to_json(arr: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(arr)
    return {
        "dtype": a.dtype.str,
        "shape": list(a.shape),
        "b64": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def _from_json(ref: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(ref["b64"])
    return np.frombuffer(raw, dtype=np.dtype(ref["dtype"])).reshape(ref["shape"])


# --------------------------------------------------------------------------- combining


@dataclass(frozen=True)
class Combined:
    """A round's combined fields and, under a deliberate fault, what it hit."""

    fields: dict[str, np.ndarray]
    victim_leaf_id: str | None = None
    victim_field: str | None = None


class _Overflow(Exception):
    pass


def _exact_add(acc: np.ndarray, x: np.ndarray) -> np.ndarray:
    """acc + x in int64 / uint64, raising ``_Overflow`` instead of wrapping."""
    out: np.ndarray = acc + x
    if acc.dtype.kind == "u":
        if np.any(out < acc):
            raise _Overflow()
    elif np.any(((acc ^ out) & (x ^ out)) < 0):
        raise _Overflow()
    return out


def _accumulator(name: str, dtype: np.dtype[Any], op: str) -> np.dtype[Any]:
    kind = dtype.kind
    if op != "sum" or kind in "US":
        return dtype
    if kind in "bi":
        return np.dtype(np.int64)
    if kind == "u":
        return np.dtype(np.uint64)
    if kind == "f":
        return np.dtype(np.float64)
    if kind == "c":
        return np.dtype(np.complex128)
    raise PlatformError(f"field {name!r}: no sum for dtype {dtype}")  # pragma: no cover


def _result(name: str, acc: np.ndarray, dtype: np.dtype[Any], op: str) -> np.ndarray:
    """The accumulated value in the field's dtype (a bool sum stays an int64 count)."""
    if op != "sum" or dtype.kind == "b" or acc.dtype == dtype:
        return acc
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if acc.size and (acc.min() < info.min or acc.max() > info.max):
            raise AnalyticsRefusal(
                "integer_overflow", f"the sum of field {name!r} does not fit in {dtype}"
            )
    return acc.astype(dtype)


def combine(
    uploads: Sequence[tuple[str, Mapping[str, np.ndarray]]],
    schema: Mapping[str, Any],
    fault: str | None = None,
) -> Combined:
    """Combine ``(leaf_id, fields)`` pairs field by field with the schema's operations.

    ``fault`` is one of ``ANALYTICS_FAULTS`` (the harness's self-test) or None.
    """
    if not uploads:
        raise AnalyticsRefusal("no_uploads", "no uploads to combine")
    victim_leaf: str | None = None
    victim_field: str | None = None
    use = list(uploads)
    if fault in ("drop_leaf", "double_count", "nan_poisoned"):
        victim = min(range(len(use)), key=lambda i: use[i][0])
        victim_leaf = use[victim][0]
        if fault == "drop_leaf":
            use = use[:victim] + use[victim + 1 :]
        elif fault == "double_count":
            use = use[: victim + 1] + [use[victim]] + use[victim + 1 :]
        else:
            floats = sorted(
                n
                for n, f in schema.items()
                if f["op"] == "sum" and np.dtype(f["dtype"]).kind == "f"
            )
            sums = [n for n in floats if n.endswith("_sum")]
            victim_field = (sums or floats)[0] if floats else None
            if victim_field is not None:
                poisoned = dict(use[victim][1])
                bad = np.array(poisoned[victim_field], dtype=np.float64, copy=True)
                bad.reshape(-1)[0] = np.nan
                poisoned[victim_field] = bad
                use[victim] = (victim_leaf, poisoned)
    elif fault is not None and fault != "mean_of_means":
        raise PlatformError(f"unknown analytics fault {fault!r}")
    out: dict[str, np.ndarray] = {}
    for name in sorted(schema):
        frozen = schema[name]
        op, dtype = frozen["op"], np.dtype(frozen["dtype"])
        acc: np.ndarray | None = None
        first_leaf = ""
        for leaf_id, fields in use:
            x = np.asarray(fields[name])
            if op == "sum":
                x = x.astype(_accumulator(name, dtype, op))
            if acc is None:
                acc, first_leaf = np.array(x, copy=True), leaf_id
            elif op == "sum":
                if acc.dtype.kind in "iu":
                    try:
                        acc = _exact_add(acc, x)
                    except _Overflow:
                        raise AnalyticsRefusal(
                            "integer_overflow",
                            f"the sum of field {name!r} overflows {acc.dtype} at leaf {leaf_id}",
                        ) from None
                else:
                    acc = acc + x
            elif op == "min":
                acc = np.minimum(acc, x)
            elif op == "max":
                acc = np.maximum(acc, x)
            elif not np.array_equal(acc, x):
                raise AnalyticsRefusal(
                    "must_match",
                    f"field {name!r}: leaf {leaf_id} differs from leaf {first_leaf}",
                )
        assert acc is not None
        out[name] = _result(name, acc, dtype, op)
    if fault == "mean_of_means":
        _pool_statistics_instead_of_sums(use, out)
    return Combined(out, victim_leaf, victim_field)


def _bundle_columns(names: Sequence[str] | Mapping[str, Any]) -> list[str]:
    """Columns whose six bundle fields are all present."""
    have = set(names)
    cols = {n[: -len("_sum")] for n in have if n.endswith("_sum")}
    return sorted(c for c in cols if all(f"{c}_{s}" in have for s in BUNDLE_SUFFIXES))


def _pool_statistics_instead_of_sums(
    uploads: Sequence[tuple[str, Mapping[str, np.ndarray]]], out: dict[str, np.ndarray]
) -> None:
    """The ``mean_of_means`` fault: each column's sums rebuilt from averaged site stats."""
    for col in _bundle_columns(out):
        means, variances = [], []
        for _, fields in uploads:
            n = np.asarray(fields[f"{col}_n"], dtype=np.float64)
            mean = np.asarray(fields[f"{col}_sum"], dtype=np.float64) / n
            means.append(mean)
            variances.append(np.asarray(fields[f"{col}_sumsq"], dtype=np.float64) / n - mean**2)
        total = np.asarray(out[f"{col}_n"], dtype=np.float64)
        mean_of_means = np.mean(means, axis=0)
        out[f"{col}_sum"] = (mean_of_means * total).astype(out[f"{col}_sum"].dtype)
        out[f"{col}_sumsq"] = (total * (np.mean(variances, axis=0) + mean_of_means**2)).astype(
            out[f"{col}_sumsq"].dtype
        )


# --------------------------------------------------------------------------- results


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def derived_stats(fields: Mapping[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per bundle column: count, sum, min, max, range, mean, variance, std, completeness.

    From the combined bundle only: mean = sum/n, variance = sumsq/n - mean^2 (population;
    a negative result of rounding is reported as 0), std = sqrt(variance), completeness =
    n / (n + nan). Bundle fields of one element give numbers; a non-finite value is null.
    Columns whose bundle fields hold more than one element are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for col in _bundle_columns(fields):
        vals = {s: np.asarray(fields[f"{col}_{s}"]) for s in BUNDLE_SUFFIXES}
        if any(v.size != 1 for v in vals.values()):
            continue
        n = int(vals["n"].reshape(-1)[0])
        nan = int(vals["nan"].reshape(-1)[0])
        total = float(vals["sum"].reshape(-1)[0])
        sumsq = float(vals["sumsq"].reshape(-1)[0])
        lo = float(vals["min"].reshape(-1)[0])
        hi = float(vals["max"].reshape(-1)[0])
        mean = total / n if n else math.nan
        variance = sumsq / n - mean * mean if n else math.nan
        if variance < 0:
            variance = 0.0
        out[col] = {
            "count": n,
            "nan": nan,
            "sum": _number(total),
            "min": _number(lo),
            "max": _number(hi),
            "range": _number(hi - lo),
            "mean": _number(mean),
            "variance": _number(variance),
            "std": _number(math.sqrt(variance)) if variance == variance else None,
            "completeness": n / (n + nan) if n + nan else None,
        }
    return out


def encode_aggregate(fields: Mapping[str, np.ndarray]) -> bytes:
    """The aggregate archive: every combined field under its name, the kind, no weighting."""
    arrays: dict[str, np.ndarray] = dict(fields)
    arrays[PAYLOAD_KIND_KEY] = np.array(FEDERATED_ANALYTICS)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def aggregate_to_file(
    uploads: Sequence[tuple[str, Path]],
    schema: Mapping[str, Any],
    fault: str | None,
    max_decompressed_bytes: int | None,
    target: Path,
) -> tuple[int, dict[str, Any], Combined]:
    """Runs in the aggregation executor: read, combine, write; (size, round result, combined)."""
    loaded = [(leaf, read_fields(path, max_decompressed_bytes)) for leaf, path in uploads]
    combined = combine(loaded, schema, fault)
    atomic_write(target, encode_aggregate(combined.fields))
    result = {
        "fields": {
            name: {
                "op": schema[name]["op"],
                "dtype": _native(arr.dtype),
                "shape": list(arr.shape),
            }
            for name, arr in combined.fields.items()
        },
        "derived": derived_stats(combined.fields),
    }
    return target.stat().st_size, result, combined
