"""``bk-sim platform``: serve --help, create-branch (0600 file, exactly six fields),
run-status; tokens come from the environment."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from bk_sim.broker import ManagementAPI
from bk_sim.cli import main
from bk_sim.platform import PlatformHandle, start_platform
from tests.integration._platform_support import read_queue

SIX = {"id", "name", "session_token", "owner_id", "tree_id", "branch_id"}


def test_serve_help_names_every_option_and_its_env_var() -> None:
    result = CliRunner().invoke(main, ["platform", "serve", "--help"])
    assert result.exit_code == 0
    for option in (
        "--host",
        "--port",
        "--data-dir",
        "--amqp-url",
        "--rabbitmq-api",
        "--admin-token",
        "--no-amqp",
        "--public-url",
        "--max-upload-bytes",
        "--max-decompressed-bytes",
        "--header-timeout",
        "--body-timeout",
        "--keepalive-timeout",
        "--max-connections",
        "--max-inflight-bytes",
        "--max-metrics-per-leaf",
        "--max-metrics-bytes-per-leaf",
        "--page-size",
    ):
        assert option in result.output
    assert "BK_SIM_ADMIN_TOKEN" in result.output and "BK_SIM_PORT" in result.output
    assert "BK_SIM_HEADER_TIMEOUT_S" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--header-timeout", "0"], "header_timeout_s must be > 0"),
        (["--max-connections", "-1"], "max_connections must be > 0"),
        (["--body-timeout", "nan"], "body_timeout_s must be > 0"),
        (["--page-size", "50", "--max-page-size", "10"], "page_size must not exceed"),
    ],
)
def test_serve_with_a_bad_limit_fails_with_a_reason(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    result = CliRunner().invoke(
        main,
        ["platform", "serve", "--data-dir", str(tmp_path), "--no-amqp", *args],
        env={"BK_SIM_ADMIN_TOKEN": "t"},
    )
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_serve_without_admin_token_fails_with_a_reason(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["platform", "serve", "--data-dir", str(tmp_path)], env={"BK_SIM_ADMIN_TOKEN": None}
    )
    assert result.exit_code == 2
    assert "--admin-token" in result.output
    # an empty one would let "Authorization: Bearer " into the admin API
    result = CliRunner().invoke(
        main, ["platform", "serve", "--data-dir", str(tmp_path), "--admin-token", " ", "--no-amqp"]
    )
    assert result.exit_code == 2
    assert "admin token must not be empty" in result.output


@pytest.mark.rabbitmq
def test_serve_with_a_malformed_amqp_url_says_so_in_one_line(
    management: ManagementAPI, tmp_path: Path
) -> None:
    from bk_sim.errors import PlatformError

    with pytest.raises(PlatformError, match="bad --amqp-url: Port could not be cast") as err:
        start_platform(tmp_path, amqp_url="amqp://guest:guest@127.0.0.1:notaport/")
    assert "Traceback" not in (tmp_path / "platform.log").read_text()
    assert "exited with code 2" in str(err.value)


@pytest.mark.rabbitmq
def test_create_branch_and_run_status(platform: PlatformHandle, tmp_path: Path) -> None:
    out = tmp_path / "leaves.json"
    out.write_text("old")
    out.chmod(0o644)  # an existing, readable file is narrowed, not kept as it was
    env = {"BK_SIM_ADMIN_TOKEN": platform.admin_token, "BK_SIM_URL": platform.url}
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "platform",
            "create-branch",
            "--leaves",
            "3",
            "--strategy",
            "median",
            "--quorum",
            "2",
            "--round-timeout",
            "5",
            "--out",
            str(out),
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    leaves = json.loads(out.read_text())
    try:
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert len(leaves) == 3 and all(set(leaf) == SIX for leaf in leaves)
        branch_id = leaves[0]["branch_id"]
        assert platform.admin.config(branch_id) == {
            "strategy": "median",
            "quorum": 2,
            "round_timeout_s": 5.0,
            "trim_fraction": 0.1,
            "model_config": {},
            "field_ops": {},
        }
        assert read_queue(leaves[0], 1)[0]["body"] == {"run_status": "start"}
        result = runner.invoke(
            main, ["platform", "run-status", "--branch", branch_id, "pause"], env=env
        )
        assert result.exit_code == 0, result.output
        assert "run_status pause run_number 1" in result.output
        assert read_queue(leaves[0], 1)[0]["body"] == {"run_status": "pause"}
        result = runner.invoke(
            main, ["platform", "run-status", "--branch", "nope", "start"], env=env
        )
        assert result.exit_code == 2
        assert "404" in result.output and "no branch nope" in result.output
    finally:
        platform.admin.delete_tree(leaves[0]["tree_id"])


@pytest.mark.rabbitmq
def test_wrong_admin_token_is_refused(platform: PlatformHandle, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "platform",
            "create-branch",
            "--url",
            platform.url,
            "--leaves",
            "1",
            "--out",
            str(tmp_path / "l.json"),
        ],
        env={"BK_SIM_ADMIN_TOKEN": "wrong"},
    )
    assert result.exit_code == 2
    assert "401" in result.output
    assert not (tmp_path / "l.json").exists()
