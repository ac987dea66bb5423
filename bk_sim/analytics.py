"""The federated-analytics (FA) archive format in one place (FEDERATED-ANALYTICS.md).

A payload is an ``.npz`` of a declared *kind*. ``federated_learning`` is the historic
``weighting`` + ``layer_0..n`` layout (``bk_sim.weights``); ``federated_analytics`` holds
named fields a site has already reduced its records to. The kind is stored under
``__bk_payload_kind__`` (a 0-d unicode array); an archive without it is learning.

``save_analytics`` turns each raw 1-D numeric column into the six-field bundle
(``<col>_n, _sum, _sumsq, _min, _max, _nan``) whose values pool exactly across sites, so
raw values never reach the archive. Client and platform both read the format from here:
the client to write and check before upload, the platform (which must not import the
client) to recognise kinds, reserved names and bundle suffixes.
"""

from __future__ import annotations

import io
import logging
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from bk_sim import weights as _weights
from bk_sim.errors import AnalyticsError
from bk_sim.files import atomic_write

_log = logging.getLogger("bk_sim.analytics")

PayloadKind = Literal["federated_learning", "federated_analytics"]
PAYLOAD_KIND_FEDERATED_LEARNING: Final = "federated_learning"
PAYLOAD_KIND_FEDERATED_ANALYTICS: Final = "federated_analytics"
PAYLOAD_KINDS: tuple[str, ...] = (PAYLOAD_KIND_FEDERATED_LEARNING, PAYLOAD_KIND_FEDERATED_ANALYTICS)
#: Archive key that declares the kind; absent means federated learning.
PAYLOAD_KIND_KEY: Final = "__bk_payload_kind__"
WEIGHTING_KEY: Final = _weights.WEIGHTING_KEY
#: Names no field may take.
RESERVED_NAMES: frozenset[str] = frozenset({WEIGHTING_KEY, PAYLOAD_KIND_KEY})

#: The bundle, in the order it is written; each suffix has a fixed combining operation.
ANALYTICS_BUNDLE_SUFFIXES: tuple[str, ...] = ("n", "sum", "sumsq", "min", "max", "nan")
#: How the platform combines each bundle field across sites, unless the branch says otherwise.
BUNDLE_OPS: Mapping[str, str] = {
    "n": "sum",
    "sum": "sum",
    "sumsq": "sum",
    "min": "min",
    "max": "max",
    "nan": "sum",
}
FIELD_OPS: tuple[str, ...] = ("sum", "min", "max", "must_match")

NanPolicy = Literal["omit", "raise"]
NAN_POLICY_OMIT: Final = "omit"
NAN_POLICY_RAISE: Final = "raise"
NAN_POLICIES: tuple[str, ...] = (NAN_POLICY_OMIT, NAN_POLICY_RAISE)

#: ``layer_<digits>`` is the positional model-parameter namespace: never a field name.
_POSITIONAL_LAYER = re.compile(r"^layer_\d+$")
#: dtype kinds a field may hold: bool, int, uint, float, complex, unicode, bytes.
FIELD_DTYPE_KINDS: Final = "biufcUS"
#: dtype kinds a raw column may have for ``save_analytics``.
COLUMN_DTYPE_KINDS: Final = "biuf"


# --------------------------------------------------------------------------- kinds


def check_kind(kind: object, where: str = "kind") -> str:
    """``kind`` if it is one of the two payload kinds, else ``AnalyticsError``."""
    if not isinstance(kind, str) or kind not in PAYLOAD_KINDS:
        raise AnalyticsError(f"{where} must be one of {', '.join(PAYLOAD_KINDS)}, got {kind!r}")
    return kind


def declared_kind(arrays: Mapping[str, np.ndarray]) -> str:
    """The kind an archive's arrays declare (learning when undeclared)."""
    if PAYLOAD_KIND_KEY not in arrays:
        return PAYLOAD_KIND_FEDERATED_LEARNING
    raw = np.asarray(arrays[PAYLOAD_KIND_KEY])
    if raw.dtype.kind not in "US" or raw.size != 1:
        raise AnalyticsError(
            f"{PAYLOAD_KIND_KEY} must be one string, got dtype {raw.dtype} with {raw.size} values"
        )
    value = raw.reshape(-1)[0]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return check_kind(text, f"the archive's {PAYLOAD_KIND_KEY}")


def bundle_suffix(name: str) -> str | None:
    """The bundle suffix a field name ends in (``age_sumsq`` -> ``sumsq``), or None."""
    for suffix in ANALYTICS_BUNDLE_SUFFIXES:  # none holds "_", so at most one matches
        if name.endswith("_" + suffix) and len(name) > len(suffix) + 1:
            return suffix
    return None


def default_op(name: str) -> str | None:
    """The operation a field gets without branch config: its bundle suffix's, else None."""
    suffix = bundle_suffix(name)
    return BUNDLE_OPS[suffix] if suffix is not None else None


# --------------------------------------------------------------------------- fields


def check_field_name(name: object) -> str:
    """``name`` if a field may take it; else ``AnalyticsError`` saying why not."""
    if not isinstance(name, str) or not name:
        raise AnalyticsError(f"field names must be non-empty strings, got {name!r}")
    if name in RESERVED_NAMES:
        raise AnalyticsError(f"field name {name!r} is reserved")
    if _POSITIONAL_LAYER.match(name):
        raise AnalyticsError(
            f"field name {name!r} is in the layer_<n> namespace of model parameters; "
            "use save_weights for those or choose another name"
        )
    return name


def coerce_field(name: str, value: Any) -> np.ndarray:
    """A field's value as stored: ``np.asarray``, a scalar made 1-D; bad dtypes refused."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise AnalyticsError(f"field {name!r} cannot be stored in an .npz: {exc}") from exc
    if arr.dtype.kind not in FIELD_DTYPE_KINDS:
        raise AnalyticsError(
            f"field {name!r} has dtype {arr.dtype}; fields must be bool, int, float, complex "
            "or fixed-width strings (object, void and datetime would need pickle)"
        )
    return np.atleast_1d(arr)


def check_field_array(name: str, arr: np.ndarray) -> None:
    """A stored FA field must be at least 1-D with an allowed dtype."""
    if arr.dtype.kind not in FIELD_DTYPE_KINDS:
        raise AnalyticsError(f"field {name!r} has dtype {arr.dtype}, which FA does not allow")
    if arr.ndim == 0:
        raise AnalyticsError(
            f"field {name!r} is 0-d; fields are at least 1-D (a hand-built archive?)"
        )


# --------------------------------------------------------------------------- the bundle


def bundle(name: str, values: Any, nan_policy: str = NAN_POLICY_OMIT) -> dict[str, np.ndarray]:
    """The six bundle fields of one raw 1-D numeric column, in suffix order.

    NaNs are dropped (``omit``, with a warning naming the column and count) or refused
    (``raise``); ``<name>_nan`` counts what was dropped and is always written. An
    infinity, an empty column (before or after dropping NaNs) and a non-1-D or
    non-numeric column are refused.
    """
    check_field_name(name)
    check_nan_policy(nan_policy)
    try:
        column = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise AnalyticsError(f"column {name!r} is not an array: {exc}") from exc
    if column.dtype.kind not in COLUMN_DTYPE_KINDS:
        raise AnalyticsError(
            f"column {name!r} has dtype {column.dtype}; save_analytics takes bool, int or "
            "float columns (use save_fields for other values)"
        )
    if column.ndim != 1:
        raise AnalyticsError(f"column {name!r} must be 1-D, got shape {column.shape}")
    if column.size == 0:
        raise AnalyticsError(f"column {name!r} is empty")
    x = column.astype(np.float64)  # ints widened before squaring: no overflow
    if np.isinf(x).any():
        raise AnalyticsError(
            f"column {name!r} holds {int(np.isinf(x).sum())} infinite value(s); "
            "an infinity would turn the pooled variance into NaN"
        )
    nan_mask = np.isnan(x)
    nans = int(nan_mask.sum())
    if nans:
        if nan_policy == NAN_POLICY_RAISE:
            raise AnalyticsError(
                f"column {name!r} holds {nans} NaN value(s) and nan_policy is 'raise'"
            )
        warnings.warn(
            f"column {name!r}: {nans} of {x.size} values are NaN and were left out",
            UserWarning,
            stacklevel=3,
        )
        x = x[~nan_mask]
        if x.size == 0:
            raise AnalyticsError(f"column {name!r} holds only NaN values")
    reduced = {
        "n": np.array([x.size], dtype=np.int64),
        "sum": np.array([x.sum()], dtype=np.float64),
        "sumsq": np.array([np.square(x).sum()], dtype=np.float64),
        "min": np.array([x.min()], dtype=np.float64),
        "max": np.array([x.max()], dtype=np.float64),
        "nan": np.array([nans], dtype=np.int64),
    }
    return {f"{name}_{s}": reduced[s] for s in ANALYTICS_BUNDLE_SUFFIXES}


def check_nan_policy(nan_policy: object) -> str:
    if not isinstance(nan_policy, str) or nan_policy not in NAN_POLICIES:
        raise AnalyticsError(
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}"
        )
    return nan_policy


def analytics_fields(
    columns: Mapping[str, Any], nan_policy: str = NAN_POLICY_OMIT
) -> dict[str, np.ndarray]:
    """The bundles of every column; a bundle name colliding with another column's is refused."""
    if not isinstance(columns, Mapping):
        raise AnalyticsError(
            f"columns must be a dict of name -> values, got {type(columns).__name__}"
        )
    if not columns:
        raise AnalyticsError("columns is empty: nothing to summarise")
    check_nan_policy(nan_policy)
    names = list(columns)
    for name in names:
        check_field_name(name)
    owner: dict[str, str] = {}
    for name in names:
        for suffix in ANALYTICS_BUNDLE_SUFFIXES:
            owner.setdefault(f"{name}_{suffix}", name)
    for name in names:
        clash = owner.get(name)
        if clash is not None:
            raise AnalyticsError(
                f"column {name!r} collides with a bundle field of column {clash!r}"
            )
    fields: dict[str, np.ndarray] = {}
    for name in names:
        for key, arr in bundle(name, columns[name], nan_policy).items():
            if key in fields:
                raise AnalyticsError(f"bundle field {key!r} of column {name!r} is written twice")
            fields[key] = arr
    return fields


def derived_statistics(fields: Mapping[str, np.ndarray], column: str) -> dict[str, float]:
    """count, sum, min, max, range, mean, variance (population), std, completeness.

    From one column's (combined) bundle; pooled from sums, never from per-site statistics.
    """
    try:
        n = int(np.asarray(fields[f"{column}_n"]).reshape(-1)[0])
        s = float(np.asarray(fields[f"{column}_sum"]).reshape(-1)[0])
        sq = float(np.asarray(fields[f"{column}_sumsq"]).reshape(-1)[0])
        lo = float(np.asarray(fields[f"{column}_min"]).reshape(-1)[0])
        hi = float(np.asarray(fields[f"{column}_max"]).reshape(-1)[0])
        nan = int(np.asarray(fields[f"{column}_nan"]).reshape(-1)[0])
    except KeyError as exc:
        raise AnalyticsError(f"column {column!r} has no complete bundle: missing {exc}") from None
    if n <= 0:
        raise AnalyticsError(f"column {column!r} has count {n}")
    mean = s / n
    variance = max(sq / n - mean * mean, 0.0)
    return {
        "count": float(n),
        "sum": s,
        "min": lo,
        "max": hi,
        "range": hi - lo,
        "mean": mean,
        "variance": variance,
        "std": float(np.sqrt(variance)),
        "completeness": n / (n + nan),
    }


# --------------------------------------------------------------------------- archives


def encode_fields(
    entries: Mapping[str, Any],
    kind: str = PAYLOAD_KIND_FEDERATED_ANALYTICS,
    weighting: float | None = None,
) -> bytes:
    """A named-field archive of ``kind`` as ``.npz`` bytes (``numpy.savez_compressed``).

    FA archives carry ``weighting`` 0.0 unless one is given; a learning archive needs an
    explicit, finite, > 0 weighting.
    """
    check_kind(kind)
    if not isinstance(entries, Mapping):
        raise AnalyticsError(
            f"entries must be a dict of name -> value, got {type(entries).__name__}"
        )
    if not entries:
        raise AnalyticsError("entries is empty: nothing to upload")
    arrays: dict[str, np.ndarray] = {}
    for name, value in entries.items():
        arrays[check_field_name(name)] = coerce_field(name, value)
    if kind == PAYLOAD_KIND_FEDERATED_LEARNING:
        if weighting is None:
            raise AnalyticsError("a federated_learning archive needs an explicit weighting")
        w = _number(weighting, "weighting")
        if not (np.isfinite(w) and w > 0):
            raise AnalyticsError(f"weighting must be finite and > 0, got {w!r}")
    else:
        w = 0.0 if weighting is None else _number(weighting, "weighting")
    arrays[WEIGHTING_KEY] = np.array([w], dtype=np.float64)
    arrays[PAYLOAD_KIND_KEY] = np.array(kind)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise AnalyticsError(f"{what} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise AnalyticsError(f"{what} must be a number, got {value!r}") from exc


def npz_path(file_path: str | os.PathLike[str]) -> Path:
    """``file_path`` with ``.npz`` appended when missing (as the published client does)."""
    target = Path(file_path)
    return target if target.suffix == ".npz" else target.with_name(target.name + ".npz")


def save_fields(
    file_path: str | os.PathLike[str],
    entries: Mapping[str, Any],
    kind: str = PAYLOAD_KIND_FEDERATED_ANALYTICS,
    weighting: float | None = None,
) -> Path:
    """Write a named-field archive atomically; returns the path (``.npz`` appended)."""
    data = encode_fields(entries, kind, weighting)
    target = npz_path(file_path)
    atomic_write(target, data)
    return target


def save_analytics(
    file_path: str | os.PathLike[str], columns: Mapping[str, Any], nan_policy: str = NAN_POLICY_OMIT
) -> Path:
    """Reduce raw columns to their bundles and write an FA archive; returns the path."""
    return save_fields(file_path, analytics_fields(columns, nan_policy))


# --------------------------------------------------------------------------- validation


def validate_payload(arrays: Mapping[str, np.ndarray]) -> str:
    """The client-side check chosen by the declared kind; returns the kind.

    Learning: ``weighting`` one value, at least one ``layer_*``. Analytics: at least one
    named field, none in the ``layer_<n>`` namespace, each at least 1-D with an allowed
    dtype. Raises ``WeightsFormatError`` (``AnalyticsError`` for FA) saying what is wrong.
    """
    kind = declared_kind(arrays)
    if kind == PAYLOAD_KIND_FEDERATED_LEARNING:
        _weights.check_arrays(arrays, strict=False)
        return kind
    names = [k for k in arrays if k not in RESERVED_NAMES]
    if not names:
        raise AnalyticsError("a federated_analytics archive holds no named fields")
    for name in names:
        if _POSITIONAL_LAYER.match(name):
            raise AnalyticsError(
                f"{name!r} is a positional layer name, not allowed in a federated_analytics archive"
            )
        check_field_array(name, arrays[name])
    if WEIGHTING_KEY in arrays and np.asarray(arrays[WEIGHTING_KEY]).size != 1:
        raise AnalyticsError("weighting must hold exactly one value")
    return kind


def load_payload(
    source: _weights.Source, *, max_decompressed_bytes: int | None = None
) -> dict[str, np.ndarray]:
    """Every array of an archive (either kind), loaded without pickle."""
    return _weights.load_arrays(source, max_decompressed_bytes=max_decompressed_bytes)


def validate_archive(source: _weights.Source) -> str:
    """Load and check an archive (path or bytes) by its declared kind; returns the kind."""
    return validate_payload(load_payload(source))


__all__ = [
    "ANALYTICS_BUNDLE_SUFFIXES",
    "BUNDLE_OPS",
    "COLUMN_DTYPE_KINDS",
    "FIELD_DTYPE_KINDS",
    "FIELD_OPS",
    "NAN_POLICIES",
    "NAN_POLICY_OMIT",
    "NAN_POLICY_RAISE",
    "PAYLOAD_KINDS",
    "PAYLOAD_KIND_FEDERATED_ANALYTICS",
    "PAYLOAD_KIND_FEDERATED_LEARNING",
    "PAYLOAD_KIND_KEY",
    "RESERVED_NAMES",
    "WEIGHTING_KEY",
    "AnalyticsError",
    "NanPolicy",
    "PayloadKind",
    "analytics_fields",
    "bundle",
    "bundle_suffix",
    "check_field_array",
    "check_field_name",
    "check_kind",
    "check_nan_policy",
    "coerce_field",
    "declared_kind",
    "default_op",
    "derived_statistics",
    "encode_fields",
    "load_payload",
    "npz_path",
    "save_analytics",
    "save_fields",
    "validate_archive",
    "validate_payload",
]
