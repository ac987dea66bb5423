"""A leaf-hosting process: several ``LeafAgent`` threads sharing one interpreter.

One process hosts many leaves (each leaf is mostly waiting on the network), so 1,000
leaves do not need 1,000 interpreters. Everything a leaf does goes back to the
orchestrator as an event dict over ``events``; the process never writes the log itself.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bk_sim.client import (
    APIConfig,
    Client,
    ClientEvent,
    ConsumerFactory,
    RabbitMQConfig,
    RetryConfig,
    WebSocketConfig,
)
from bk_sim.engine import LeafPlan, client_event, harness_event, process_rss
from bk_sim.errors import BkSimError
from bk_sim.npzstream import return_freed_chunks
from bk_sim.scenario import Scenario
from bk_sim.sim._agent import AggregateCache, LeafAgent
from bk_sim.sim._fa_agent import AnalyticsLeafAgent
from bk_sim.synth import tabular_spec
from bk_sim.tls import CA_ENV_VARS

_log = logging.getLogger(__name__)

_STOP_POLL_S = 0.2


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; picklable, holds no live objects."""

    worker: int
    scenario: Scenario
    api_url: str
    transport: str  # "amqp" or "websocket"
    amqp_host: str | None
    amqp_port: int | None
    aggregates_dir: Path
    plans: tuple[LeafPlan, ...] = field(repr=False)
    incarnation: int = 0  # > 0: started again after being killed (chaos)
    #: platform.tls: the run's CA (PEM); leaves use TLS everywhere and trust only it.
    tls_ca: str | None = None
    #: every leaf here dies in one round (leaves.dropouts.die_fraction): once they all
    #: have, the process kills itself with SIGKILL, mid-run, as a crashed leaf would
    dies: bool = False


class _QueueObserver:
    """Forwards client events to the orchestrator, tagged with the leaf's index."""

    def __init__(self, put: Callable[[dict[str, Any]], None], leaf: int) -> None:
        self._put = put
        self._leaf = leaf

    def on_event(self, event: ClientEvent) -> None:
        self._put(client_event(event, leaf=self._leaf))


def tls_client_env(ca: str) -> dict[str, str]:
    """The environment that makes a leaf's client trust ``ca`` (and only it)."""
    return {name: ca for name in CA_ENV_VARS}


def make_client(
    spec: WorkerSpec,
    plan: LeafPlan,
    observer: Any,
    output_dir: Path,
    consumer_factory: ConsumerFactory | None = None,
) -> Client:
    """A client configured from the scenario's client settings."""
    sc = spec.scenario.client
    return Client(
        plan.credentials,
        api_config=APIConfig(host=spec.api_url, ssl=spec.tls_ca is not None),
        rabbitmq_config=RabbitMQConfig(
            host=spec.amqp_host,
            port=spec.amqp_port or 5672,
            ssl=spec.tls_ca is not None,
            max_reconnect_attempts=sc.reconnect.max_attempts,
            reconnect_backoff_factor=sc.reconnect.backoff_factor,
            reconnect_max_delay=sc.reconnect.max_delay,
            heartbeat=sc.reconnect.heartbeat,
        ),
        websocket_config=WebSocketConfig(
            max_reconnect_attempts=sc.reconnect.max_attempts,
            reconnect_backoff_factor=sc.reconnect.backoff_factor,
            reconnect_max_delay=sc.reconnect.max_delay,
        ),
        retry_config=RetryConfig(
            max_retries=sc.retry.max_retries,
            backoff_factor=sc.retry.backoff_factor,
            total_timeout=sc.retry.total_timeout,
        ),
        use_websocket=spec.transport == "websocket",
        output_dir=output_dir,
        observer=observer,
        consumer_factory=consumer_factory,
    )


def _leaf_thread(
    spec: WorkerSpec,
    plan: LeafPlan,
    put: Callable[[dict[str, Any]], None],
    cache: AggregateCache,
    work_dir: Path,
    stop: threading.Event,
    died: Callable[[int], None] | None = None,
) -> None:
    def event(kind: str, **fields: Any) -> None:
        put(harness_event(kind, leaf=plan.index, leaf_id=plan.leaf_id, **fields))

    if plan.start_delay_s > 0 and stop.wait(plan.start_delay_s):
        return
    sc = spec.scenario
    leaf_dir = work_dir / f"leaf-{plan.index}"
    leaf_dir.mkdir(parents=True, exist_ok=True)
    event(
        "leaf_starting",
        weighting=plan.weighting,
        process=spec.worker,
        first_round=plan.first_round if plan.first_round > 1 else None,
    )
    try:
        client = make_client(spec, plan, _QueueObserver(put, plan.index), leaf_dir)
    except BkSimError as exc:
        event("leaf_error", round=0, error=f"client could not start: {exc}")
        return
    except Exception as exc:  # noqa: BLE001 - a harness bug must be reported, not hang the run
        _log.exception("leaf %d: unexpected error starting its client", plan.index)
        event("leaf_error", round=0, error=f"unexpected: {type(exc).__name__}: {exc}")
        return
    # pid and RSS: the process's at-rest memory, the base of the memory bound (issue 17).
    event(
        "leaf_started",
        run_status=client.run_status,
        run_number=client.run_number,
        pid=os.getpid(),
        rss=process_rss(),
    )
    common: dict[str, Any] = {
        "seed": sc.seed,
        "model": sc.model,
        "rounds": sc.rounds,
        "compression": sc.payload.compression,
        "notification_timeout_s": sc.timeouts.notification_s,
        "client": client,
        "work_dir": leaf_dir,
        "cache": cache,
        "emit": lambda ev: put(ev.to_dict()),
        "stop": stop,
    }
    agent = (
        AnalyticsLeafAgent(plan, tabular=tabular_spec(sc), **common)
        if sc.payload.kind == "federated_analytics"
        else LeafAgent(plan, **common)
    )
    try:
        agent.run()
        if agent.died and died is not None:
            died(plan.index)  # returns only when the run stops before the process is killed
    except Exception as exc:  # noqa: BLE001 - report, never hang the run
        _log.exception("leaf %d: unexpected error", plan.index)
        event("leaf_error", round=-1, error=f"unexpected: {type(exc).__name__}: {exc}")
    finally:
        client.close()
        event("leaf_closed")


def die(events: Any) -> None:
    """SIGKILL this process, after its events (the leaves' ``leaf_died``) are sent."""
    events.close()
    events.join_thread()
    os.kill(os.getpid(), signal.SIGKILL)


def worker_main(spec: WorkerSpec, events: Any, stop: Any) -> None:
    """Process entry point: run this worker's leaves in threads until done or stopped."""
    # Ctrl-C reaches the whole process group: the orchestrator alone decides, and tells
    # the workers through ``stop``, so leaves close their clients cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    if spec.tls_ca is not None:
        # The client's own CA settings, as for the published client: requests reads
        # REQUESTS_CA_BUNDLE (HTTPS), OpenSSL's default paths SSL_CERT_FILE (AMQPS, WSS).
        os.environ.update(tls_client_env(spec.tls_ca))
    return_freed_chunks()  # leaves stream their uploads in chunks (issue 17)
    put: Callable[[dict[str, Any]], None] = events.put
    local_stop = threading.Event()
    cache = AggregateCache(spec.aggregates_dir)
    dead: set[str] = set()
    dead_lock = threading.Lock()

    def died(index: int) -> None:
        with dead_lock:
            dead.add(f"leaf-{index}")
        local_stop.wait()

    # A leaf thread still closing after the stop may write into it while it is removed.
    with tempfile.TemporaryDirectory(
        prefix=f"bk-sim-w{spec.worker}-", ignore_cleanup_errors=True
    ) as tmp:
        threads = [
            threading.Thread(
                target=_leaf_thread,
                args=(spec, plan, put, cache, Path(tmp), local_stop, died if spec.dies else None),
                name=f"leaf-{plan.index}",
                daemon=True,
            )
            for plan in spec.plans
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if stop.is_set():
                local_stop.set()
            with dead_lock:
                gone = bool(dead) and all(t.name in dead for t in threads if t.is_alive())
            if gone and not local_stop.is_set():
                die(events)
            time.sleep(_STOP_POLL_S)
            if local_stop.is_set():
                for t in threads:
                    t.join(timeout=10)
                break
    put(harness_event("worker_done", process=spec.worker))
