"""Locust load on the platform's leaf API (``bk-sim load``).

``LeafUser`` (``_user``) drives the faithful client; ``LocustObserver`` (``_observer``)
turns the client's events into Locust ``request`` events; ``LoadRun`` (``_run``) runs
Locust in library mode, headless, with its web UI, or as master / worker. Importing this
package does not import Locust: Locust monkey-patches with gevent on import, so the
modules that need it are imported only by a process that patched first
(``python -m bk_sim.load``, which ``bk-sim load`` re-executes into).
"""

__all__: list[str] = []
