"""Locust load on the platform's leaf API (``bk-sim load``).

``LeafUser`` (``_user``) drives the faithful client; ``LocustObserver`` (``_observer``)
turns the client's events into Locust ``request`` events; ``LoadRun`` (``_run``) runs
Locust in library mode on the run engine, headless, with its web UI, or as master /
worker. Importing this package does not import Locust: Locust monkey-patches with gevent
on import, so its names here are imported on first use, by a process that patched first
(``bk-sim load`` re-executes itself so that it does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the type checker only: importing them at run time imports Locust
    from bk_sim.load._payloads import build_payloads
    from bk_sim.load._run import LoadOptions, LoadRun
    from bk_sim.load._user import LoadContext, user_class

__all__ = ["LoadContext", "LoadOptions", "LoadRun", "build_payloads", "user_class"]

_WHERE = {
    "LoadContext": "bk_sim.load._user",
    "user_class": "bk_sim.load._user",
    "LoadOptions": "bk_sim.load._run",
    "LoadRun": "bk_sim.load._run",
    "build_payloads": "bk_sim.load._payloads",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
