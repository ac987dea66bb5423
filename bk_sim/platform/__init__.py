"""The reference BranchKey platform (PROTOCOL.md section 7), for local runs and tests.

``start_platform(data_dir)`` runs it as a child process on a free port and returns a
``PlatformHandle`` (``url``, ``admin_token``, ``admin``, ``stop()``, ``restart()``);
``AdminClient`` talks to its admin API; ``PlatformConfig`` + ``serve`` run it in this
process (what ``bk-sim platform serve`` does). ``Limits`` holds its time, connection,
memory and quota bounds (``limit_options`` adds them to a click command as serve flags);
docs/platform-hardening.md explains each.
"""

from bk_sim.platform._admin_client import AdminClient
from bk_sim.platform._aggregate import READ_THREADS, Upload, aggregate, streaming_average
from bk_sim.platform._aggregate import STRATEGIES as AGGREGATION_STRATEGIES
from bk_sim.platform._analytics_cli import parse_field_ops
from bk_sim.platform._app import (
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    PlatformConfig,
    build_app,
)
from bk_sim.platform._handle import PlatformHandle, start_platform
from bk_sim.platform._limits import Limits, limit_options
from bk_sim.platform._serve import serve
from bk_sim.platform._zipstream import validate_stored

__all__ = [
    "AGGREGATION_STRATEGIES",
    "DEFAULT_AMQP_URL",
    "DEFAULT_MAX_DECOMPRESSED_BYTES",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "READ_THREADS",
    "Upload",
    "aggregate",
    "streaming_average",
    "AdminClient",
    "Limits",
    "PlatformConfig",
    "PlatformHandle",
    "build_app",
    "limit_options",
    "parse_field_ops",
    "serve",
    "start_platform",
    "validate_stored",
]
