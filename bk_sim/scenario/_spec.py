"""The typed scenario: frozen dataclasses, their defaults and their documentation.

This module is the one place the schema lives. Every field carries a ``doc`` (and, where it
has one, a range) in its metadata; the loader (``_loader.py``) converts and checks YAML
against these types, and ``scenario_schema_doc()`` renders the README table from them.
Constructing the classes directly does not validate: use ``load_scenario`` or
``scenario_from_dict``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Mode = Literal["local", "remote"]
Strategy = Literal["fedavg", "mean", "median", "trimmed_mean"]
AggregationFault = Literal["unweighted", "drop_leaf", "double_count", "stale"]
#: Federated analytics (docs/analytics.md): the payload kinds and the platform's FA faults.
PayloadKind = Literal["federated_learning", "federated_analytics"]
AnalyticsFault = Literal["mean_of_means", "drop_leaf", "nan_poisoned", "double_count"]
BrokerProvider = Literal["auto", "external", "local", "process", "testcontainers", "none"]
Transport = Literal["amqp", "websocket"]
LeafHostKind = Literal["threads", "event_loop"]
Distribution = Literal["fixed", "uniform", "lognormal", "list"]
Compression = Literal["faithful", "fast", "stored"]
#: The leaf client that is our own (``client.implementation``'s default).
OWN_IMPLEMENTATION = "bk_sim"
#: Endpoints the platform's admin faults API knows (``*`` = all leaf endpoints).
FaultEndpoint = Literal[
    "*", "upload", "download", "download_url", "run", "metrics", "branch_config", "ws_ticket"
]

STRATEGIES: tuple[str, ...] = ("fedavg", "mean", "median", "trimmed_mean")
DTYPES: tuple[str, ...] = (
    "float16", "float32", "float64",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
)  # fmt: skip
#: Keys each weighting distribution takes (besides ``distribution``).
DISTRIBUTION_KEYS: dict[str, tuple[str, ...]] = {
    "fixed": ("value",),
    "uniform": ("low", "high"),
    "lognormal": ("mu", "sigma"),
    "list": ("values",),
}


def _f(default: Any = dataclasses.MISSING, doc: str = "", **meta: Any) -> Any:
    """A dataclass field with its documentation (and optional range) in metadata."""
    metadata = {"doc": doc, **meta}
    if default is dataclasses.MISSING:
        return field(metadata=metadata)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- platform


@dataclass(frozen=True, kw_only=True)
class HttpFaultSpec:
    """One HTTP fault rule, as the platform's admin faults API takes it."""

    endpoint: FaultEndpoint = _f("*", "endpoint the rule matches (`*` = every leaf endpoint)")
    status: int | None = _f(None, "answer with this HTTP status instead", ge=100, le=599)
    rate: float = _f(1.0, "probability a matching request is hit", ge=0.0, le=1.0)
    count: int | None = _f(None, "stop after this many hits (null = no limit)", ge=1)
    retry_after: float | None = _f(None, "`Retry-After` seconds sent with the status", ge=0.0)
    latency_s: float = _f(0.0, "extra delay before answering", ge=0.0)
    reset: bool = _f(False, "reset the TCP connection instead of answering")
    drop_response: bool = _f(False, "do the work but drop the response")


@dataclass(frozen=True, kw_only=True)
class NotificationFaultSpec:
    """Faults on the platform's notification publishing."""

    delay_s: float = _f(0.0, "delay before each notification is published", ge=0.0)
    drop_rate: float = _f(0.0, "probability a notification is not published", ge=0.0, le=1.0)


@dataclass(frozen=True, kw_only=True)
class FaultsSpec:
    """Faults the platform injects, to prove the harness catches them."""

    aggregation: AggregationFault | None = _f(
        None, "deliberately wrong aggregation (the validator must fail the round)"
    )
    analytics: AnalyticsFault | None = _f(
        None, "deliberately wrong analytics combining (federated_analytics payloads only)"
    )
    http: tuple[HttpFaultSpec, ...] = _f((), "HTTP fault rules (list of mappings)")
    notifications: NotificationFaultSpec = _f(NotificationFaultSpec, "notification faults")
    dedupe: bool = _f(True, "same-digest re-uploads count once (false: a platform bug)")


@dataclass(frozen=True, kw_only=True)
class PlatformSpec:
    """Which platform the leaves talk to and how it aggregates."""

    mode: Mode = _f("local", "`local` starts the reference platform; `remote` uses `host`")
    strategy: Strategy = _f("fedavg", "aggregation strategy of the branch")
    quorum: int | None = _f(None, "uploads a round needs to close on timeout (null = all)", ge=1)
    round_timeout_s: float | None = _f(
        None, "close a round with >= quorum uploads after this long (null = wait for all)", gt=0.0
    )
    trim_fraction: float = _f(0.1, "fraction cut at each end by `trimmed_mean`", ge=0.0, lt=0.5)
    max_upload_bytes: int | None = _f(
        None, "local: the platform's upload limit (null = follows from the model)", ge=1
    )
    max_decompressed_bytes: int | None = _f(
        None, "local: the platform's decoded-archive limit (null = follows from the model)", ge=1
    )
    faults: FaultsSpec = _f(FaultsSpec, "fault injection (local, or remote with `admin_url`)")
    tls: bool = _f(
        False,
        "local: HTTPS, WSS and AMQPS (bk-sim's own broker node) with a CA made for the run; "
        "leaves verify both against it",
    )
    host: str | None = _f(None, "remote: the platform's base URL")
    credentials_file: Path | None = _f(
        None, "remote: JSON list of leaf credentials (six fields); relative to the scenario"
    )
    admin_url: str | None = _f(None, "remote, optional: admin API base URL (round records)")
    admin_token: str | None = _f(None, "remote, optional: admin API token (never reported)")


@dataclass(frozen=True, kw_only=True)
class BrokerSpec:
    """Where the AMQP broker comes from."""

    provider: BrokerProvider = _f(
        "auto",
        "`auto`: external URL, else bk-sim's own node (`process`) when the run restarts the "
        "broker, uses TLS or outgrows the local service, else local service, else testcontainers",
    )
    amqp_url: str | None = _f(None, "broker URL for `external` (or a hint for `auto`)")
    management_url: str | None = _f(None, "management API URL (with credentials)")


# --------------------------------------------------------------------------- leaves


@dataclass(frozen=True, kw_only=True)
class WeightingSpec:
    """How leaves' weightings (sample counts) are drawn; only the distribution's keys."""

    distribution: Distribution = _f("fixed", "`fixed`, `uniform`, `lognormal` or `list`")
    value: float = _f(1.0, "fixed: every leaf's weighting", gt=0.0)
    low: float = _f(1.0, "uniform: lower bound", gt=0.0)
    high: float = _f(1000.0, "uniform: upper bound (>= low)", gt=0.0)
    mu: float = _f(6.0, "lognormal: mean of log(weighting)")
    sigma: float = _f(1.0, "lognormal: std of log(weighting)", ge=0.0)
    values: tuple[float, ...] = _f((), "list: one weighting per leaf (length = leaves.count)")


@dataclass(frozen=True, kw_only=True)
class StragglersSpec:
    """Leaves that upload late."""

    fraction: float = _f(0.0, "fraction of leaves that straggle", ge=0.0, le=1.0)
    delay_s: float = _f(0.0, "how late a straggler uploads", ge=0.0)


@dataclass(frozen=True, kw_only=True)
class DropoutsSpec:
    """Leaves that miss rounds."""

    skip_fraction: float = _f(0.0, "fraction of leaf-rounds skipped (no upload)", ge=0.0, le=1.0)
    die_fraction: float = _f(
        0.0, "fraction of leaves whose process is killed mid-run", ge=0.0, le=1.0
    )


@dataclass(frozen=True, kw_only=True)
class LeavesSpec:
    """The simulated leaves."""

    count: int = _f(doc="number of leaves", ge=1)
    processes: int | None = _f(None, "leaf processes (null = min(count, 2 x CPUs))", ge=1)
    weighting: WeightingSpec = _f(WeightingSpec, "leaves' weightings")
    start_jitter_s: float = _f(0.0, "each leaf starts after a random delay up to this", ge=0.0)
    stragglers: StragglersSpec = _f(StragglersSpec, "late leaves")
    dropouts: DropoutsSpec = _f(DropoutsSpec, "leaves that skip rounds or die")
    implementations: dict[str, float] | None = _f(
        None,
        "mixed fleet: fraction of leaves per client implementation, e.g. "
        '`{bk_sim: 0.5, "branchkey==2.9.0": 0.5}` (fractions sum to 1; leaves drawn with '
        "the seed; null = all `client.implementation`)",
    )
    host: LeafHostKind = _f(
        "threads",
        "`threads`: a thread (and a consumer thread) per leaf; `event_loop`: a process's "
        "leaves on one event loop (WebSocket consumers keep a thread each)",
    )

    @property
    def effective_processes(self) -> int:
        """``processes``, or ``min(count, 2 x CPUs)`` when it is not set."""
        if self.processes is not None:
            return self.processes
        return max(1, min(self.count, (os.cpu_count() or 1) * 2))


# --------------------------------------------------------------------------- model etc.


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """One tensor of the model."""

    shape: tuple[int, ...] = _f(doc="dimensions (`[]` = a 0-d scalar)")
    dtype: str = _f(doc="`float16/32/64`, `int8..int64`, `uint8..uint64`")

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The model's tensors: ``preset: NAME`` or explicit ``layers`` (exactly one)."""

    layers: tuple[LayerSpec, ...] = _f(doc="`[{shape: [..], dtype: float32}, ...]`")
    preset: str | None = _f(None, "`tiny`, `small`, `mlp_1m` or `cnn_small`")

    @property
    def parameter_count(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of one upload's layers, uncompressed."""
        import numpy as np

        return sum(layer.size * np.dtype(layer.dtype).itemsize for layer in self.layers)


@dataclass(frozen=True, kw_only=True)
class TabularSpecFields:
    """Synthetic tabular columns of each leaf (``payload.kind: federated_analytics``);
    the scenario's ``seed`` seeds them (see ``bk_sim.synth.TabularSpec``)."""

    columns: int = _f(20, "raw columns per site (kinds cycle float, float, int, bool)", ge=1)
    rows_median: int = _f(2000, "median rows per site (log-normal row counts)", ge=1)
    rows_sigma: float = _f(0.5, "sigma of the log-normal row counts", ge=0.0)
    rows_min: int = _f(50, "fewest rows a site has", ge=1)
    rows_max: int = _f(20000, "most rows a site has", ge=1)
    shift: float = _f(1.0, "per-site mean shift, in units of the column's scale", ge=0.0)
    nan_fraction: float = _f(0.05, "mean NaN fraction of float columns", ge=0.0, lt=0.5)
    custom_fields: bool = _f(True, "also send custom save_fields entries (sum/min/max/must_match)")


@dataclass(frozen=True, kw_only=True)
class PayloadSpec:
    """How uploads are written."""

    compression: Compression = _f(
        "fast", "`faithful` (numpy, zlib 6), `fast` (ISA-L level 1) or `stored`"
    )
    kind: PayloadKind = _f(
        "federated_learning",
        "`federated_learning` (model weights) or `federated_analytics` (tabular statistics)",
    )
    tabular: TabularSpecFields = _f(TabularSpecFields, "analytics: the synthetic columns")


@dataclass(frozen=True, kw_only=True)
class TimeoutsSpec:
    """How long the harness waits before it calls something lost."""

    notification_s: float = _f(120.0, "wait for a round's aggregation notification", gt=0.0)
    run_s: float = _f(1800.0, "whole run", gt=0.0)
    leaf_start_s: float = _f(60.0, "a leaf process to start and report ready", gt=0.0)


@dataclass(frozen=True, kw_only=True)
class RetrySpec:
    """HTTP retries of the leaf client (PROTOCOL.md section 5)."""

    max_retries: int = _f(3, "retries after the first attempt", ge=0)
    backoff_factor: float = _f(1.0, "wait before retry n: factor x 2^(n-1) s", ge=0.0)
    total_timeout: float = _f(30.0, "per-request timeout", gt=0.0)


@dataclass(frozen=True, kw_only=True)
class ReconnectSpec:
    """Notification-transport reconnects of the leaf client."""

    max_attempts: int = _f(10, "reconnect attempts (0 = never give up)", ge=0)
    backoff_factor: float = _f(2.0, "wait: min(factor^attempt, max_delay) s", ge=0.0)
    max_delay: float = _f(60.0, "longest wait between attempts", gt=0.0)
    heartbeat: int = _f(30, "AMQP heartbeat seconds", ge=0)


@dataclass(frozen=True, kw_only=True)
class ClientSpec:
    """Leaf client settings."""

    implementation: str = _f(
        "bk_sim",
        "the leaf client: `bk_sim` (ours) or a pip requirement of the published client "
        "(`branchkey==2.9.0`, `branchkey>=3`), run in its own cached env",
    )
    retry: RetrySpec = _f(RetrySpec, "HTTP retries")
    reconnect: ReconnectSpec = _f(ReconnectSpec, "notification reconnects")


@dataclass(frozen=True, kw_only=True)
class ValidationSpec:
    """How returned aggregates are checked (see ``bk_sim.validate.tolerance_for``)."""

    rtol: float | None = _f(None, "relative tolerance (null = derived from the dtype)", ge=0.0)
    atol: float | None = _f(None, "absolute tolerance (null = derived from the dtype)", ge=0.0)
    forensics_sample: int = _f(4096, "coordinates sampled to recover leaf weights", ge=1)
    strategy: Strategy | None = _f(
        None, "strategy the reference uses (null = `platform.strategy`; set it to test a mismatch)"
    )


@dataclass(frozen=True, kw_only=True)
class ReportSpec:
    """Where the run writes."""

    dir: Path = _f(Path("reports"), "parent folder of `<name>-<timestamp>/` (relative to cwd)")


# --------------------------------------------------------------------------- load


@dataclass(frozen=True, kw_only=True)
class LoadStageSpec:
    """One stage of a load shape: run ``users`` users until ``until_s`` after the start."""

    until_s: float = _f(doc="end of the stage, seconds after the load started", gt=0.0)
    users: int = _f(doc="users during the stage", ge=0)
    spawn_rate: float | None = _f(
        None, "users started or stopped per second (null = `load.spawn_rate`)", gt=0.0
    )


@dataclass(frozen=True, kw_only=True)
class LoadTasksSpec:
    """Relative weights of the Locust user's tasks (0 = never)."""

    upload: int = _f(4, "upload the leaf's weights (payloads made before the load)", ge=0)
    download: int = _f(
        2, "wait for the newest aggregation notification, download that aggregate", ge=0
    )
    metrics: int = _f(1, "send performance metrics for the newest aggregate", ge=0)
    branch_config: int = _f(1, "read the branch configuration", ge=0)


@dataclass(frozen=True, kw_only=True)
class LoadSpec:
    """`bk-sim load`: Locust users, one leaf each, driving the leaf client."""

    users: int = _f(10, "peak concurrent users (leaves created: max(users, leaves.count))", ge=1)
    spawn_rate: float = _f(10.0, "users started per second", gt=0.0)
    duration_s: float = _f(30.0, "load duration (with `stages`: their last `until_s`)", gt=0.0)
    wait_min_s: float = _f(0.0, "shortest pause between a user's tasks", ge=0.0)
    wait_max_s: float = _f(0.5, "longest pause between a user's tasks (>= wait_min_s)", ge=0.0)
    tasks: LoadTasksSpec = _f(LoadTasksSpec, "task mix")
    stages: tuple[LoadStageSpec, ...] = _f((), "load shape: stages in time order (list)")
    notifications: bool = _f(True, "users consume notifications (per `transport`)")
    aggregate_wait_s: float = _f(10.0, "download task: longest wait for a notification", gt=0.0)
    payload_variants: int = _f(4, "distinct upload payloads, made before the load starts", ge=1)
    p95_ms: float | None = _f(
        None, "threshold: p95 of HTTP attempts, ms (null = not judged)", gt=0.0
    )
    error_rate: float | None = _f(
        None, "threshold: failed fraction of HTTP attempts (null = not judged)", ge=0.0, le=1.0
    )


# --------------------------------------------------------------------------- chaos

ChaosKind = Literal[
    "kill_connections",
    "close_channel",
    "restart_broker",
    "latency",
    "bandwidth",
    "blackhole",
    "reset_peer",
    "slow_close",
    "http",
    "kill_leaf",
    "kill_platform",
]
ChaosPhase = Literal[
    "round_start", "first_upload", "uploads_half_done", "awaiting_aggregate", "round_closed"
]
AggregatesExpectation = Literal["correct", "any"]
#: Chaos kinds that last (they need ``duration_s``); the others are instantaneous.
LASTING_CHAOS: tuple[str, ...] = ("latency", "bandwidth", "blackhole", "slow_close", "http")
#: Chaos kinds that act on the leaves' TCP path to the broker (through the chaos proxy).
PROXY_CHAOS: tuple[str, ...] = ("latency", "bandwidth", "blackhole", "reset_peer", "slow_close")


@dataclass(frozen=True, kw_only=True)
class ChaosFaultSpec:
    """One scheduled fault of `bk-sim chaos`: when (`at_s` or `round` + `when`), what, whom."""

    kind: ChaosKind = _f(
        doc="`kill_connections`, `close_channel`, `restart_broker`, `latency`, `bandwidth`, "
        "`blackhole`, `reset_peer`, `slow_close`, `http`, `kill_leaf` or `kill_platform` (the "
        "local platform SIGKILLed and started again on its port and data)"
    )
    name: str | None = _f(None, "label in events and results (default: `<kind>-<index>`)")
    at_s: float | None = _f(
        None, "start this long after the leaves spawn (or give `round`)", ge=0.0
    )
    round: int | None = _f(None, "start in this round, at the phase `when`", ge=1)
    when: ChaosPhase = _f(
        "round_start",
        "`round_start` (previous round's uploads all in), `first_upload`, `uploads_half_done`, "
        "`awaiting_aggregate` (all uploads in, before notifications), `round_closed`",
    )
    delay_s: float = _f(0.0, "extra wait after the trigger", ge=0.0)
    duration_s: float | None = _f(
        None, "how long it lasts (latency, bandwidth, blackhole, slow_close, http)", gt=0.0
    )
    leaves: float = _f(
        1.0,
        "fraction of leaves hit, drawn with the seed (connection, channel and leaf faults)",
        gt=0.0,
        le=1.0,
    )
    latency_s: float = _f(0.0, "latency: added per direction", ge=0.0)
    jitter_s: float = _f(0.0, "latency: extra uniform random delay up to this", ge=0.0)
    bandwidth_kbps: float | None = _f(None, "bandwidth: kB/s per direction and connection", gt=0.0)
    close_delay_s: float = _f(1.0, "slow_close: delay before the other side is closed", ge=0.0)
    http: HttpFaultSpec | None = _f(None, "http: the platform fault rule set for `duration_s`")
    restart: bool = _f(False, "kill_leaf: start the killed leaves again for the next round")


@dataclass(frozen=True, kw_only=True)
class ChaosExpectSpec:
    """What must hold despite the faults; each key becomes a check (null = not judged)."""

    lost_notifications: int | None = _f(0, "most notifications lost", ge=0)
    duplicate_notifications: int | None = _f(0, "most notifications handled twice", ge=0)
    max_reconnect_s: float | None = _f(
        30.0, "longest disconnect -> connected again, per leaf and fault", gt=0.0
    )
    max_detect_s: float | None = _f(None, "longest fault start -> disconnect seen", gt=0.0)
    aggregates: AggregatesExpectation = _f("correct", "`correct`: every round validates")
    duplicate_uploads: int | None = _f(0, "most uploads a round record counts twice", ge=0)
    backoff: bool = _f(True, "reconnect waits follow min(factor^n, max_delay)")


@dataclass(frozen=True, kw_only=True)
class ChaosSpec:
    """`bk-sim chaos`: the fault schedule and what is expected to survive it."""

    faults: tuple[ChaosFaultSpec, ...] = _f((), "scheduled faults (list)")
    expect: ChaosExpectSpec = _f(ChaosExpectSpec, "checks judged after the run")
    broker_restartable: bool = _f(
        False, "the broker is this run's own: `restart_broker` may stop and start it"
    )
    restart_command: tuple[str, ...] = _f(
        ("rabbitmqctl",), "command prefix of `stop_app`/`start_app` for a local broker"
    )


# --------------------------------------------------------------------------- scenario


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """One validated scenario; ``source`` is the file it came from (None: built in code)."""

    name: str = _f(doc="run name, `[A-Za-z0-9_.-]+` (default: the file's stem)")
    seed: int = _f(0, "seed of every random draw (weights, weightings, schedules)", ge=0)
    platform: PlatformSpec = _f(PlatformSpec, "the platform")
    broker: BrokerSpec = _f(BrokerSpec, "the AMQP broker")
    transport: Transport = _f("amqp", "notification transport: `amqp` or `websocket`")
    leaves: LeavesSpec = _f(doc="the leaves")
    model: ModelSpec = _f(doc="the model")
    payload: PayloadSpec = _f(PayloadSpec, "upload encoding")
    rounds: int = _f(1, "rounds to play", ge=1)
    timeouts: TimeoutsSpec = _f(TimeoutsSpec, "timeouts")
    client: ClientSpec = _f(ClientSpec, "leaf client settings")
    validation: ValidationSpec = _f(ValidationSpec, "aggregate checks")
    report: ReportSpec = _f(ReportSpec, "report output")
    load: LoadSpec = _f(LoadSpec, "`bk-sim load` settings")
    chaos: ChaosSpec = _f(ChaosSpec, "`bk-sim chaos` fault schedule")
    source: Path | None = field(default=None, metadata={"doc": "", "internal": True})

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results.json: Paths as strings, tuples as lists, no secrets
        (the admin token, and the passwords in the broker URLs)."""
        from bk_sim.redact import redact_url

        out = _plain(self)
        assert isinstance(out, dict)
        if out["platform"].get("admin_token") is not None:
            out["platform"]["admin_token"] = "***"
        for key in ("amqp_url", "management_url"):
            if out["broker"].get(key) is not None:
                out["broker"][key] = redact_url(out["broker"][key])
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value
