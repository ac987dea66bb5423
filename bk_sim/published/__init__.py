"""The published ``branchkey`` client as a leaf under test, side by side with ours.

- ``prepare(requirement)`` builds (or reuses) an isolated, cached venv holding one
  published release; ``list_envs()`` shows the cache.
- ``PublishedLeafProcess`` runs the leaf runner inside such an env and speaks its JSON
  lines protocol; events come back as frozen dataclasses.
- ``UNOBSERVABLE`` names what the harness cannot see from outside the package.

bk_sim code never imports ``branchkey``: it runs only inside those envs.
"""

from bk_sim.published._envs import (
    CACHE_ENV_VAR,
    PublishedEnv,
    default_cache_dir,
    list_envs,
    prepare,
    transports_for,
)
from bk_sim.published._requirement import BranchkeyRequirement, parse_requirement

__all__ = [
    "CACHE_ENV_VAR",
    "BranchkeyRequirement",
    "PublishedEnv",
    "default_cache_dir",
    "list_envs",
    "parse_requirement",
    "prepare",
    "transports_for",
]
