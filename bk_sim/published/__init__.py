"""The published ``branchkey`` client as a leaf under test, side by side with ours.

- ``prepare(requirement)`` builds (or reuses) an isolated, cached venv holding one
  published release; ``list_envs()`` shows the cache.
  ``bk-sim clients prepare|list`` (bk_sim.cli) calls them.
- ``PublishedLeafProcess`` runs the leaf runner inside such an env and speaks its JSON
  lines protocol; ``LeafSettings`` says how each client is built; events come back as
  frozen dataclasses (``Reply``, ``HttpAttempt``, ``Notification``...).
- ``as_client_event`` maps runner events onto the kinds bk_sim's own client reports, so
  one judge reads both.
- ``OBSERVED`` / ``UNOBSERVABLE`` / ``unobservable()`` say what the harness sees of the
  package from outside, and what it cannot, for results.json.

bk_sim never imports ``branchkey``: it runs only inside those envs, and the harness
writes and reads every weights file with its own numpy.
"""

from bk_sim.published._envs import (
    CACHE_ENV_VAR,
    PublishedEnv,
    default_cache_dir,
    list_envs,
    prepare,
    transports_for,
)
from bk_sim.published._events import (
    Bye,
    ConsumerPhase,
    ConsumerStopped,
    Fatal,
    HttpAttempt,
    HttpRequest,
    HttpRetry,
    HttpRetryWait,
    LogLine,
    Notification,
    NotificationBlocked,
    NotificationDropped,
    Printed,
    Ready,
    Reply,
    RunnerEvent,
    RunnerExited,
    RunStatus,
    Unknown,
    parse_event,
)
from bk_sim.published._observability import OBSERVED, UNOBSERVABLE, Unobservable, unobservable
from bk_sim.published._process import LeafSettings, PublishedLeafProcess, runner_script
from bk_sim.published._requirement import BranchkeyRequirement, parse_requirement
from bk_sim.published._vocabulary import as_client_event, endpoint_of

__all__ = [
    "CACHE_ENV_VAR",
    "OBSERVED",
    "UNOBSERVABLE",
    "BranchkeyRequirement",
    "Bye",
    "ConsumerPhase",
    "ConsumerStopped",
    "Fatal",
    "HttpAttempt",
    "HttpRequest",
    "HttpRetry",
    "HttpRetryWait",
    "LeafSettings",
    "LogLine",
    "Notification",
    "NotificationBlocked",
    "NotificationDropped",
    "Printed",
    "PublishedEnv",
    "PublishedLeafProcess",
    "Ready",
    "Reply",
    "RunStatus",
    "RunnerEvent",
    "RunnerExited",
    "Unknown",
    "Unobservable",
    "as_client_event",
    "default_cache_dir",
    "endpoint_of",
    "list_envs",
    "parse_event",
    "parse_requirement",
    "prepare",
    "runner_script",
    "transports_for",
    "unobservable",
]
