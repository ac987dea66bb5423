"""bk-sim's own RabbitMQ node (provider ``process``) from the local installation.

Real nodes, real signals: a node is started, used, restarted with its data kept, and
removed with nothing left behind, also when the block raises, on Ctrl-C and after the
harness was SIGKILLed (the next start sweeps it). The shared broker on 5672 is only read.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pika
import pytest

from bk_sim.broker import (
    _process,
    process_available,
    provide_broker,
    restart_broker,
)
from bk_sim.errors import BrokerError

_OK, _WHY = process_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"cannot start a RabbitMQ node here: {_WHY}")


def _leftovers(directory: Path) -> list[int]:
    return _process._pids_mentioning(str(directory))


def _shared_broker_pid() -> int | None:
    """The shared node's VM (its home is the installation's data dir), to prove it survives."""
    pids = _process._pids_mentioning("-home /var/lib/rabbitmq")
    return pids[0] if pids else None


def _wait_gone(directory: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while (directory.exists() or _leftovers(directory)) and time.monotonic() < deadline:
        time.sleep(0.2)


def test_own_node_serves_restarts_with_data_kept_and_is_removed() -> None:
    shared = _shared_broker_pid()
    with provide_broker("process") as endpoints:
        node = endpoints._node
        assert node is not None and endpoints.provider == "process" and endpoints.restartable
        assert endpoints.reason.startswith("process: asked for; own node bksim-")
        assert (node.open_files_limit() or 0) >= 20000  # room for 10,000 connections
        assert endpoints.amqp_host_port()[1] != 5672
        params = pika.URLParameters(str(endpoints.amqp_url))
        conn = pika.BlockingConnection(params)
        ch = conn.channel()
        ch.queue_declare("bk-sim-durable", durable=True)
        ch.basic_publish("", "bk-sim-durable", b"kept", pika.BasicProperties(delivery_mode=2))
        conn.close()
        after = restart_broker(endpoints)
        assert after.amqp_url == endpoints.amqp_url  # same ports: clients reconnect as-is
        assert len(node.start_times) == 2 and len(node.stop_times) == 1
        conn = pika.BlockingConnection(params)
        method, _, body = conn.channel().basic_get("bk-sim-durable", auto_ack=True)
        conn.close()
        assert body == b"kept"  # durable queue and persistent message survived
        directory = node.dir
    assert not directory.exists()
    assert _leftovers(directory) == []
    assert _shared_broker_pid() == shared  # the shared broker was never touched


def test_an_error_inside_the_run_still_removes_the_node() -> None:
    with pytest.raises(RuntimeError):
        with provide_broker("process") as endpoints:
            assert endpoints._node is not None
            directory = endpoints._node.dir
            raise RuntimeError("the run failed")
    assert not directory.exists()
    assert _leftovers(directory) == []


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from bk_sim.broker import provide_broker
    with provide_broker("process") as endpoints:
        print(endpoints._node.dir, flush=True)
        time.sleep(600)
    """
)


def _start_holder() -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"the node did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, Path(line)


def test_ctrl_c_stops_and_removes_the_node() -> None:
    proc, directory = _start_holder()
    assert directory.exists() and _leftovers(directory)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    _wait_gone(directory)
    assert not directory.exists()
    assert _leftovers(directory) == []


def test_a_node_left_by_a_killed_harness_is_swept_by_the_next_start() -> None:
    proc, directory = _start_holder()
    proc.kill()  # SIGKILL: no finally runs, the node lives on
    proc.communicate(timeout=10)
    assert directory.exists() and _leftovers(directory)
    assert directory in _process.sweep_orphans(directory.parent)
    _wait_gone(directory, timeout=10)
    assert not directory.exists()
    assert _leftovers(directory) == []


def test_a_missing_installation_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_process.ENV_SERVER, "/nonexistent/rabbitmq-server")
    with pytest.raises(BrokerError, match="BK_SIM_RABBITMQ_SERVER=/nonexistent/rabbitmq-server"):
        with provide_broker("process"):
            pass


def test_auto_prefers_an_own_node_when_the_run_restarts_its_broker() -> None:
    lines: list[str] = []
    with provide_broker("auto", needs_restart=True, on_status=lines.append) as endpoints:
        assert endpoints.provider == "process"
        assert "the run restarts its broker" in lines[0]  # said on the first line
        assert "shared broker on 127.0.0.1:5672" in lines[0]


def test_a_failing_status_callback_does_not_skip_the_teardown() -> None:
    def status(line: str) -> None:
        if "stopping and removing" in line:
            raise BrokenPipeError("stdout closed (bk-sim ... | head)")

    with pytest.raises(BrokenPipeError):
        with provide_broker("process", on_status=status) as endpoints:
            assert endpoints._node is not None
            directory = endpoints._node.dir
    assert not directory.exists()
    assert _leftovers(directory) == []
