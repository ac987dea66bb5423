"""Keep secrets out of the platform's log, including what aiohttp logs on its own.

When aiohttp refuses a request while parsing it, it logs the exception, whose text holds
the raw request line (a signed URL's ``?expires=&sig=``, a WebSocket ``?ticket=``) or the
first bytes of an oversized header (a bearer token). ``install_log_filters`` puts a filter
on aiohttp's loggers that replaces such a record by its class of error, and scrubs query
strings and bearer credentials from every other record of the platform's loggers.
"""

from __future__ import annotations

import logging
import re
import traceback

from aiohttp.http_exceptions import HttpProcessingError

_LOGGERS = (
    "aiohttp.server",
    "aiohttp.access",
    "aiohttp.web",
    "aiohttp.internal",
    "aiohttp.websocket",
    "bk_sim.platform",
)
_SECRET_RE = re.compile(
    r"(?i)(bearer\s+)[^\s'\"]+|([?&](?:sig|expires|ticket|request_id|token)=)[^\s&'\"#]*"
)


def scrub(text: str) -> str:
    """``text`` with bearer credentials and signature-like query values replaced."""
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2)) + "<redacted>", text)


class _SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            # The message of a parse error quotes the request; keep only what kind it was.
            record.msg = "refused a malformed request (%s, HTTP %s)"
            record.args = (type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: drop the arguments, keep the record
            message = str(record.msg)
        clean = scrub(message)
        if record.exc_info:
            text = "".join(traceback.format_exception(*record.exc_info))
            clean = clean + "\n" + scrub(text).rstrip("\n")
            record.exc_info, record.exc_text = None, None
        if clean != message:
            record.msg, record.args = clean, None
        return True


_FILTER = _SecretFilter()


def install_log_filters() -> None:
    """Idempotent: attach the filter to aiohttp's and the platform's loggers.

    A logger's filter sees only records logged on that very logger, so every platform
    module's logger gets it (they exist once the platform is imported), and so do the
    root handlers present now (records from anywhere else that reach them).
    """
    names = set(_LOGGERS) | {
        n for n in logging.root.manager.loggerDict if n.startswith("bk_sim.platform")
    }
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
