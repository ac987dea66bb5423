"""The one way bk-sim shows a URL to a person: no password, no query string.

Broker URLs carry passwords in their user info; pre-signed download URLs carry their
signature in the query. Every log line, error message and report shows URLs through
``redact_url``, which never raises: a URL bad enough to fail parsing is exactly the one
an error message must show.
"""

from __future__ import annotations

import urllib.parse

__all__ = ["redact_url"]


def redact_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***`` and its query and fragment cut off."""
    if url is None:
        return "-"
    text = url.split("#", 1)[0].split("?", 1)[0]
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # unbalanced IPv6 brackets and the like: the cut text is all we have
        return _mask_userinfo(text)
    if "@" not in parts.netloc:
        return text
    # From the netloc text, not parts.port/hostname: those raise for a bad port
    # ("ftp://u:pw@h:99999"), and a bad URL is what an error message shows.
    user_info, _, host_port = parts.netloc.rpartition("@")
    user = user_info.split(":", 1)[0]
    masked = f"{user}:***@{host_port}" if ":" in user_info else parts.netloc
    return urllib.parse.urlunsplit((parts.scheme, masked, parts.path, "", ""))


def _mask_userinfo(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return text
    user_info, _, tail = rest.partition("@")
    user = user_info.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in user_info else text
