"""The run engine: one ``RunEnvironment`` that ``bk-sim run``, ``chaos`` and ``load`` use.

It provides the broker, starts or reaches the platform and provisions leaf credentials,
hosts leaves through a ``LeafHost``, gathers the one event stream (``EventLog``), judges
the run with typed ``Check``s and writes results.json and the reports.
"""

from bk_sim.engine._checks import (
    Check,
    FetchAggregate,
    Judgement,
    as_time,
    judge,
    records_from_events,
)
from bk_sim.engine._env import PlatformAccess, PlatformNeeds, RunEnvironment
from bk_sim.engine._eventlog import (
    REDACTED,
    EventLog,
    HarnessEvent,
    client_event,
    harness_event,
    make_harness_event,
    read_events,
    redact,
)
from bk_sim.engine._host import Event, HookContext, LeafHost, RunHooks
from bk_sim.engine._limits import PlatformLimits, platform_limits, preflight
from bk_sim.engine._memory import MemorySampler, memory_check, process_rss
from bk_sim.engine._plan import LeafPlan, leaf_implementations, plan_leaves
from bk_sim.engine._progress import RunCounters, Say, StatusBoard
from bk_sim.engine._records import RecordedUpload, RoundRecord, RoundVerdict
from bk_sim.engine._results import RunResult, RunTimes, iso, verdict, write_json

__all__ = [
    "REDACTED",
    "Check",
    "Event",
    "EventLog",
    "FetchAggregate",
    "HarnessEvent",
    "HookContext",
    "Judgement",
    "LeafHost",
    "LeafPlan",
    "MemorySampler",
    "PlatformAccess",
    "PlatformLimits",
    "PlatformNeeds",
    "RecordedUpload",
    "RoundRecord",
    "RoundVerdict",
    "RunCounters",
    "RunEnvironment",
    "RunHooks",
    "RunResult",
    "RunTimes",
    "Say",
    "StatusBoard",
    "as_time",
    "client_event",
    "harness_event",
    "iso",
    "judge",
    "leaf_implementations",
    "make_harness_event",
    "memory_check",
    "plan_leaves",
    "platform_limits",
    "preflight",
    "process_rss",
    "read_events",
    "records_from_events",
    "redact",
    "verdict",
    "write_json",
]
