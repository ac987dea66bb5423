"""Which published client a requirement string names, checked before pip ever sees it.

Only the ``branchkey`` distribution with a version specifier is accepted: no other
package, no URL, no extras, no environment marker. A requirement is handed to pip as one
argument (never through a shell), but refusing everything else up front keeps
``branchkey>=3; rm -rf`` and ``notbranchkey`` one-line errors instead of pip failures.
"""

from __future__ import annotations

from dataclasses import dataclass

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from bk_sim.errors import PublishedClientError

DISTRIBUTION = "branchkey"
"""The one distribution a published-client requirement may name."""

_OPERATOR_NAMES = {
    "===": "arb",
    "~=": "compat",
    "==": "eq",
    "!=": "ne",
    ">=": "ge",
    "<=": "le",
    ">": "gt",
    "<": "lt",
}
_MAX_LENGTH = 200


@dataclass(frozen=True)
class BranchkeyRequirement:
    """A checked requirement of the published client, e.g. ``branchkey==2.9.0``.

    ``text`` is the canonical form (specifiers sorted, no spaces), the one pip gets and
    the one results name; ``dirname`` is a file-system-safe name for its cached env.
    """

    text: str
    specifier: SpecifierSet

    @property
    def dirname(self) -> str:
        parts = [DISTRIBUTION]
        for spec in sorted(self.specifier, key=str):
            version = spec.version.replace("*", "x")
            parts.append(f"{_OPERATOR_NAMES[spec.operator]}{version}")
        return "_".join(parts)

    def allows(self, version: str) -> bool:
        """Whether an installed ``version`` satisfies this requirement (pre-releases too)."""
        try:
            return self.specifier.contains(Version(version), prereleases=True)
        except InvalidVersion:
            return False

    def __str__(self) -> str:
        return self.text


def parse_requirement(text: str) -> BranchkeyRequirement:
    """Check ``text`` names the ``branchkey`` distribution with a version specifier.

    Raises ``PublishedClientError`` (exit code 2) with a one-line reason otherwise.
    """
    raw = text.strip() if isinstance(text, str) else ""
    shown = raw[:80] + ("..." if len(raw) > 80 else "")
    if not raw:
        raise PublishedClientError("client requirement is empty: expected e.g. branchkey==2.9.0")
    if len(raw) > _MAX_LENGTH or any(ch in raw for ch in "\n\r\t\0"):
        raise PublishedClientError(
            f"client requirement {shown!r} is malformed: expected e.g. branchkey==2.9.0"
        )
    try:
        req = Requirement(raw)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        raise PublishedClientError(
            f"client requirement {shown!r} is malformed ({reason}): expected e.g. branchkey==2.9.0"
        ) from None
    if canonicalize_name(req.name) != DISTRIBUTION:
        raise PublishedClientError(
            f"client requirement {shown!r} names {req.name!r}: only the {DISTRIBUTION!r} "
            "distribution can be a leaf implementation (e.g. branchkey==2.9.0)"
        )
    if req.url:
        raise PublishedClientError(
            f"client requirement {shown!r} is a URL: give a version specifier instead "
            "(e.g. branchkey==2.9.0)"
        )
    if req.extras:
        raise PublishedClientError(
            f"client requirement {shown!r} has extras: give the plain distribution with a "
            "version specifier (e.g. branchkey==2.9.0)"
        )
    if req.marker is not None:
        raise PublishedClientError(
            f"client requirement {shown!r} has an environment marker: give only a "
            "version specifier (e.g. branchkey==2.9.0)"
        )
    if not req.specifier:
        raise PublishedClientError(
            f"client requirement {shown!r} has no version specifier: pin one so runs are "
            "repeatable (e.g. branchkey==2.9.0 or branchkey>=3)"
        )
    spec = req.specifier
    canonical = DISTRIBUTION + ",".join(sorted(str(s) for s in spec))
    return BranchkeyRequirement(text=canonical, specifier=spec)
