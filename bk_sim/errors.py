"""One exception tree for everything bk-sim raises on purpose.

::

    BkSimError                       exit code 2 unless said otherwise
    ├── WeightsFormatError           an .npz that breaks PROTOCOL.md section 3
    │   └── AnalyticsError           a federated-analytics payload or column refused
    ├── ClientError                  the leaf client could not do what was asked
    │   ├── ClientConfigError        bad credentials or settings (before any request)
    │   ├── RunBlockedError          upload refused: the run is not started
    │   ├── UnsafeFileIdError        a file id that would leave the output folder
    │   ├── TransportError           no HTTP answer: connection refused, reset, timeout
    │   └── ApiError                 the platform answered with an error status
    │       ├── AuthError            401 / 403
    │       └── NotFoundError        404
    ├── PlatformError                the reference platform could not start or serve
    │   └── AggregationError         uploads that cannot be aggregated together
    ├── ScenarioError                a scenario file or override that is wrong
    ├── BrokerError                  no usable RabbitMQ where one was needed
    ├── ReportError                  a folder that is not a run folder (bk-sim report)
    ├── PublishedClientError         a published branchkey client env or runner failed
    └── CheckFailed                  a validation check failed (exit code 1)

Third-party exceptions (requests, pika, websockets, aiohttp) are translated at the edge
with ``raise ... from exc`` and never escape the client core.
"""

from __future__ import annotations


class BkSimError(Exception):
    """Base of every error bk-sim raises; ``exit_code`` is what the CLI exits with."""

    exit_code: int = 2


class WeightsFormatError(BkSimError, ValueError):
    """A weights archive does not follow the NPZ format of PROTOCOL.md section 3."""


class AnalyticsError(WeightsFormatError):
    """A federated-analytics payload, field or raw column breaks the FA contract."""


class ClientError(BkSimError):
    """The leaf client could not complete a call."""


class ClientConfigError(ClientError, ValueError):
    """Credentials or client settings are wrong; raised before any request is made."""


class RunBlockedError(ClientError):
    """An upload was refused on the client side because the run is not started."""


class UnsafeFileIdError(ClientError, ValueError):
    """A file id would resolve outside the output folder (``../x``, ``a/b``)."""


class TransportError(ClientError):
    """No HTTP answer after all retries: connection refused, reset or timed out."""


class ApiError(ClientError):
    """The platform answered with an error status after all retries.

    ``status`` is the HTTP status and ``message`` the body's ``error`` text (or a short
    preview of the body when it is not the JSON error shape).
    """

    def __init__(self, method: str, url: str, status: int, message: str) -> None:
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        super().__init__(f"{method} {url} failed with HTTP {status}: {message}")


class AuthError(ApiError):
    """The platform refused the leaf's credentials (401) or access (403)."""


class NotFoundError(ApiError):
    """The platform has no such resource (404)."""


class PlatformError(BkSimError):
    """The reference platform could not start, or a call to it failed."""


class AggregationError(PlatformError, ValueError):
    """A round's uploads cannot be aggregated: none, mismatched layers, or a bad strategy."""


class ScenarioError(BkSimError, ValueError):
    """A scenario is wrong; the message names the file, the key path and what was wrong."""


class BrokerError(BkSimError):
    """No usable RabbitMQ where the run needs one; the message says how to fix it."""


class ReportError(BkSimError):
    """A report cannot be rendered: the folder is not a run folder, or its files are unreadable."""


class PublishedClientError(BkSimError):
    """A published ``branchkey`` requirement is malformed, not installable, or its leaf
    runner failed; the message names the requirement and what went wrong."""


class CheckFailed(BkSimError):
    """A validation check failed: the run completed but its verdict is 'failed'."""

    exit_code = 1
