"""``bk-sim platform``: serve the reference platform, create a branch, set its run status.

Every option also reads ``BK_SIM_<NAME>`` from the environment (``BK_SIM_ADMIN_TOKEN``...),
so tokens need not appear on a command line.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import click

from bk_sim.broker import DEFAULT_MANAGEMENT_URL
from bk_sim.files import SECRET_MODE, atomic_write
from bk_sim.platform import AGGREGATION_STRATEGIES as STRATEGIES
from bk_sim.platform import (
    DEFAULT_AMQP_URL,
    DEFAULT_MAX_DECOMPRESSED_BYTES,
    DEFAULT_MAX_UPLOAD_BYTES,
    AdminClient,
    Limits,
    PlatformConfig,
    limit_options,
    parse_field_ops,
)

_ADMIN_TOKEN = click.option(
    "--admin-token",
    envvar="BK_SIM_ADMIN_TOKEN",
    required=True,
    show_envvar=True,
    help="Bearer token of the admin API (better from the environment than the command line).",
)
_URL = click.option(
    "--url",
    envvar="BK_SIM_URL",
    default="http://127.0.0.1:8080",
    show_default=True,
    show_envvar=True,
    help="Base URL of the platform.",
)


@click.group("platform")
def platform() -> None:
    """The reference BranchKey platform: serve it, create branches, control runs."""


@platform.command("serve")
@click.option(
    "--host",
    envvar="BK_SIM_HOST",
    default="127.0.0.1",
    show_default=True,
    show_envvar=True,
    help="Address to listen on.",
)
@click.option(
    "--port",
    envvar="BK_SIM_PORT",
    default=8080,
    show_default=True,
    type=int,
    show_envvar=True,
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--data-dir",
    envvar="BK_SIM_DATA_DIR",
    default="./platform-data",
    show_default=True,
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the SQLite store, the files and the URL-signing key live.",
)
@click.option(
    "--amqp-url",
    envvar="BK_SIM_AMQP_URL",
    default=DEFAULT_AMQP_URL,
    show_default=True,
    show_envvar=True,
    help="RabbitMQ the platform publishes notifications to.",
)
@click.option(
    "--rabbitmq-api",
    envvar="BK_SIM_RABBITMQ_API",
    default=DEFAULT_MANAGEMENT_URL,
    show_default=True,
    show_envvar=True,
    help="RabbitMQ management API used to provision vhosts, users and queues.",
)
@_ADMIN_TOKEN
@click.option(
    "--no-amqp",
    envvar="BK_SIM_NO_AMQP",
    is_flag=True,
    show_envvar=True,
    help="Run without RabbitMQ: notifications go over WebSocket only.",
)
@click.option(
    "--public-url",
    envvar="BK_SIM_PUBLIC_URL",
    default=None,
    show_envvar=True,
    help="Base URL put into download URLs (default: the Host the leaf used).",
)
@click.option(
    "--max-upload-bytes",
    envvar="BK_SIM_MAX_UPLOAD_BYTES",
    type=int,
    default=DEFAULT_MAX_UPLOAD_BYTES,
    show_default=True,
    show_envvar=True,
    help="Largest accepted upload file; larger is refused with 413.",
)
@click.option(
    "--max-decompressed-bytes",
    envvar="BK_SIM_MAX_DECOMPRESSED_BYTES",
    type=int,
    default=DEFAULT_MAX_DECOMPRESSED_BYTES,
    show_default=True,
    show_envvar=True,
    help="Largest decompressed size of an upload (zip-bomb guard).",
)
@limit_options
@click.option(
    "--ready-file",
    envvar="BK_SIM_READY_FILE",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help='Write {"url", "pid"} here once listening (for supervisors).',
)
@click.option(
    "--tls-cert",
    envvar="BK_SIM_TLS_CERT",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve HTTPS and WSS with this certificate chain (PEM; with --tls-key).",
)
@click.option(
    "--tls-key",
    envvar="BK_SIM_TLS_KEY",
    default=None,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key of --tls-cert (PEM).",
)
@click.option(
    "--exit-on-stdin-eof",
    is_flag=True,
    hidden=True,
    help="Stop when stdin closes (set by start_platform: dies with its parent).",
)
def serve_cmd(
    host: str,
    port: int,
    data_dir: Path,
    amqp_url: str,
    rabbitmq_api: str,
    admin_token: str,
    no_amqp: bool,
    public_url: str | None,
    max_upload_bytes: int,
    max_decompressed_bytes: int,
    ready_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    exit_on_stdin_eof: bool,
    limits: Limits,
) -> None:
    """Serve the leaf API, the admin API and the WebSocket endpoint until Ctrl-C."""
    from bk_sim.platform import serve

    data_dir.mkdir(parents=True, exist_ok=True)
    config = PlatformConfig(
        data_dir=data_dir,
        admin_token=admin_token,
        amqp_url=amqp_url,
        management_url=rabbitmq_api,
        no_amqp=no_amqp,
        public_url=public_url,
        max_upload_bytes=max_upload_bytes,
        max_decompressed_bytes=max_decompressed_bytes,
        limits=limits,
    )
    serve(
        config,
        host=host,
        port=port,
        ready_file=ready_file,
        exit_on_stdin_eof=exit_on_stdin_eof,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )


@platform.command("create-branch")
@_URL
@_ADMIN_TOKEN
@click.option(
    "--leaves",
    envvar="BK_SIM_LEAVES",
    type=click.IntRange(1, 10_000),
    required=True,
    show_envvar=True,
    help="Number of leaves to create.",
)
@click.option(
    "--strategy",
    envvar="BK_SIM_STRATEGY",
    type=click.Choice(STRATEGIES),
    default="fedavg",
    show_default=True,
    show_envvar=True,
    help="Aggregation strategy of the branch.",
)
@click.option(
    "--quorum",
    envvar="BK_SIM_QUORUM",
    type=click.IntRange(min=1),
    default=None,
    show_envvar=True,
    help="Uploads needed to close a round at timeout (default all).",
)
@click.option(
    "--round-timeout",
    envvar="BK_SIM_ROUND_TIMEOUT",
    type=float,
    default=None,
    show_envvar=True,
    help="Seconds after a round opens before quorum may close it.",
)
@click.option(
    "--field-op",
    "field_op",
    multiple=True,
    metavar="NAME=OP",
    help="Federated analytics: the operation (sum, min, max, must_match) of a field; "
    "repeatable. Bundle fields (<col>_n, _sum, _sumsq, _min, _max, _nan) need none.",
)
@click.option(
    "--tree-name",
    envvar="BK_SIM_TREE_NAME",
    default=None,
    show_envvar=True,
    help="Name of the new tree (default: a unique one).",
)
@click.option(
    "--out",
    envvar="BK_SIM_OUT",
    required=True,
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the leaves' credentials (JSON list, mode 0600).",
)
def create_branch_cmd(
    url: str,
    admin_token: str,
    leaves: int,
    strategy: str,
    quorum: int | None,
    round_timeout: float | None,
    field_op: tuple[str, ...],
    tree_name: str | None,
    out: Path,
) -> None:
    """Create a tree and a branch with N leaves, start its run, write leaves.json."""
    field_ops = parse_field_ops(field_op)
    with AdminClient(url, admin_token) as admin:
        tree_id = admin.create_tree(tree_name or f"bk-sim-{uuid.uuid4().hex[:8]}")
        branch = admin.create_branch(
            tree_id,
            "branch",
            strategy=strategy,
            quorum=quorum,
            round_timeout_s=round_timeout,
            field_ops=field_ops,
        )
        creds = admin.create_leaves(branch["branch_id"], leaves)
        admin.set_run_status(branch["branch_id"], "start")
    fields = ("id", "name", "session_token", "owner_id", "tree_id", "branch_id")
    text = json.dumps([{k: c[k] for k in fields} for c in creds], indent=2) + "\n"
    atomic_write(out, text, mode=SECRET_MODE)
    click.echo(f"tree {tree_id} branch {branch['branch_id']}: {leaves} leaves written to {out}")


@platform.command("run-status")
@_URL
@_ADMIN_TOKEN
@click.option(
    "--branch",
    "branch_id",
    envvar="BK_SIM_BRANCH",
    required=True,
    show_envvar=True,
    help="Branch id.",
)
@click.argument("status", type=click.Choice(("start", "pause", "stop")))
def run_status_cmd(url: str, admin_token: str, branch_id: str, status: str) -> None:
    """Set a branch's run status (publishes run_status to its leaves)."""
    with AdminClient(url, admin_token) as admin:
        result = admin.set_run_status(branch_id, status)
    click.echo(
        f"branch {branch_id}: run_status {result['run_status']} run_number {result['run_number']}"
    )
