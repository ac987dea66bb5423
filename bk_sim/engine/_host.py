"""Where a run's leaves live, and the hooks a workload (chaos) may put into a run.

``LeafHost`` is the one interface between the engine and the leaves: today local leaf
processes (``bk_sim.sim``), later other client implementations or other machines. The
engine only starts a host, reads its event stream and stops it; chaos may also kill and
restart the process slot hosting a leaf.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bk_sim.broker import BrokerEndpoints
from bk_sim.engine._checks import Check, Judgement
from bk_sim.engine._plan import LeafPlan
from bk_sim.engine._records import RoundRecord
from bk_sim.scenario import Scenario

if TYPE_CHECKING:  # leaf processes import the engine: they need no platform (aiohttp)
    from bk_sim.platform import AdminClient, PlatformHandle

Event = dict[str, Any]


class LeafHost(Protocol):
    """Hosts a run's leaves and hands their events to the engine, in order per leaf."""

    def start(self) -> None:
        """Start every leaf (they begin after their own start delay)."""
        ...

    def next_event(self, timeout: float) -> Event | None:
        """The next event of any leaf, or None when none came within ``timeout`` s."""
        ...

    def emit(self, event: Mapping[str, Any]) -> None:
        """Put an event of the harness into the stream (thread-safe)."""
        ...

    def running(self) -> bool:
        """True while a leaf may still send events."""
        ...

    def signal_stop(self) -> None:
        """Ask every leaf to stop; returns at once."""
        ...

    def stop(self, sink: Callable[[Event], None]) -> None:
        """Stop every leaf (gracefully, then by force) and pass on what they still send."""
        ...

    def worker_of(self, leaf_index: int) -> int:
        """The slot (process, machine) hosting a leaf."""
        ...

    def leaves_of(self, worker: int) -> list[LeafPlan]:
        """The leaves a slot hosts."""
        ...

    def kill(self, worker: int) -> int | None:
        """Kill a slot at once (SIGKILL); its pid, or None when it was not running."""
        ...

    def restart(self, worker: int, first_round: int, known: frozenset[str]) -> None:
        """Start a slot's leaves again, playing rounds ``first_round`` on."""
        ...


@dataclass(frozen=True)
class HookContext:
    """What a run hook (chaos) may use while the leaves play.

    ``emit`` puts an event into the run's stream (it reaches the log and ``on_event``
    like a leaf's). ``admin`` and ``branch_id`` are None for a remote platform.
    """

    scenario: Scenario
    run_dir: Path
    endpoints: BrokerEndpoints
    admin: AdminClient | None
    branch_id: str | None
    base_faults: dict[str, Any]
    credentials: list[dict[str, str]]
    plans: list[LeafPlan]
    emit: Callable[[Mapping[str, Any]], None]
    workers: LeafHost
    #: the local platform's process (chaos ``kill_platform``); None for a remote one
    platform: PlatformHandle | None = None


class RunHooks(Protocol):
    """Optional hooks into a run (``bk-sim chaos``), all called on the engine's thread;
    none may block it for long."""

    #: The results.json key ``judge``'s section is written under.
    section: str

    def prepare(
        self, endpoints: BrokerEndpoints, host: str | None, port: int | None
    ) -> tuple[str | None, int | None]:
        """Before any leaf starts: refuse what cannot be done; where leaves connect for
        AMQP (e.g. a proxy in front of ``host:port``)."""
        ...

    def begin(self, ctx: HookContext) -> None:
        """The leaves are started; the run's resources are in ``ctx``."""
        ...

    def on_event(self, event: Event) -> None:
        """Every event of the run, as it is logged."""
        ...

    def end(self) -> None:
        """The leaves are done or being stopped (also on errors and Ctrl-C); idempotent."""
        ...

    def judge(
        self,
        events: list[Event],
        records: list[RoundRecord] | None,
        judgement: Judgement,
    ) -> tuple[list[Check], dict[str, Any]]:
        """Extra checks and a results.json section of their own."""
        ...
