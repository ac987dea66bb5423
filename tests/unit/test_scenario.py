"""Scenario loading: every shipped scenario loads; every broken one says exactly what is wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bk_sim.errors import ScenarioError
from bk_sim.scenario import (
    PRESETS,
    Scenario,
    load_scenario,
    scenario_from_dict,
    scenario_schema_doc,
)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["smoke", "100_leaves", "1000_leaves", "stragglers_dropouts", "strategies"]

BASE = "name: t\nleaves:\n  count: 4\nmodel:\n  preset: tiny\n"


def _write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# (id, file text or None for "no file", overrides, fragments the message must contain)
BROKEN = [
    (
        "unknown key with suggestion",
        "name: t\nleaves:\n  cuont: 4\nmodel:\n  preset: tiny\n",
        (),
        ["s.yaml:3:", "leaves.cuont", "unknown key 'cuont'", "did you mean 'leaves.count'?"],
    ),
    (
        "unknown top-level key",
        BASE + "round: 3\n",
        (),
        ["s.yaml:6:", "unknown key 'round' at the top level", "did you mean 'rounds'?"],
    ),
    (
        "wrong type",
        "name: t\nleaves:\n  count: four\nmodel:\n  preset: tiny\n",
        (),
        ["s.yaml:3:", "leaves.count: expected an integer; found 'four' (a string)"],
    ),
    (
        "bool is not an integer",
        BASE + "rounds: true\n",
        (),
        ["rounds: expected an integer; found true (a boolean)"],
    ),
    (
        "out of range",
        BASE.replace("count: 4", "count: 4\n  weighting: {distribution: lognormal, sigma: -1}"),
        (),
        ["leaves.weighting.sigma: expected a number >= 0.0; found -1.0"],
    ),
    (
        "fraction out of [0, 1]",
        BASE,
        ("leaves.stragglers.fraction=1.5",),
        ["(--set leaves.stragglers.fraction=1.5)", "expected a number in [0.0, 1.0]; found 1.5"],
    ),
    (
        "bad enum",
        BASE + "platform:\n  strategy: fedavgg\n",
        (),
        [
            "platform.strategy: expected one of fedavg, mean, median, trimmed_mean",
            "found 'fedavgg' (a string); did you mean 'fedavg'?",
        ],
    ),
    (
        "remote without host",
        BASE + "platform:\n  mode: remote\n",
        (),
        ["platform.host: is required when platform.mode is 'remote'"],
    ),
    (
        "host in local mode",
        BASE + "platform:\n  host: https://x\n",
        (),
        ["platform.host: applies only to platform.mode 'remote'"],
    ),
    (
        "both preset and layers",
        BASE + "  layers:\n  - {shape: [2], dtype: float32}\n",
        (),
        ["model: give either model.preset or model.layers, not both"],
    ),
    (
        "neither preset nor layers",
        "name: t\nleaves:\n  count: 4\nmodel: {}\n",
        (),
        ["model: expected model.preset (a named model) or model.layers; found neither"],
    ),
    (
        "missing required section",
        "name: t\nmodel:\n  preset: tiny\n",
        (),
        ["leaves: is required"],
    ),
    (
        "unknown preset",
        BASE.replace("preset: tiny", "preset: mlp1m"),
        (),
        ["model.preset: expected one of tiny, small, mlp_1m, cnn_small", "did you mean 'mlp_1m'?"],
    ),
    (
        "bad layer dtype",
        "name: t\nleaves: {count: 2}\nmodel:\n  layers:\n  - {shape: [3], dtype: float31}\n",
        (),
        ["model.layers[0].dtype: expected one of float16", "did you mean 'float32'?"],
    ),
    (
        "zero dimension",
        "name: t\nleaves: {count: 2}\nmodel:\n  layers:\n  - {shape: [3, 0], dtype: int8}\n",
        (),
        ["model.layers[0].shape[1]: expected an integer >= 1; found 0"],
    ),
    (
        "weighting key of another distribution",
        BASE.replace("count: 4", "count: 4\n  weighting: {distribution: fixed, sigma: 2}"),
        (),
        ["leaves.weighting.sigma: does not apply to distribution 'fixed'; it takes only value"],
    ),
    (
        "weighting list of the wrong length",
        BASE.replace("count: 4", "count: 4\n  weighting: {distribution: list, values: [1, 2]}"),
        (),
        ["leaves.weighting.values: expected one value per leaf (4); found 2"],
    ),
    (
        "processes above count",
        BASE,
        ("leaves.processes=9",),
        ["(--set leaves.processes=9)", "leaves.processes: expected at most leaves.count (4)"],
    ),
    (
        "dropouts without a round timeout",
        BASE,
        ("leaves.dropouts.skip_fraction=0.2",),
        ["leaves.dropouts: needs platform.round_timeout_s"],
    ),
    (
        "quorum above count",
        BASE + "platform: {quorum: 5, round_timeout_s: 3}\n",
        (),
        ["platform.quorum: expected at most leaves.count (4); found 5"],
    ),
    (
        "quorum without round timeout",
        BASE + "platform: {quorum: 2}\n",
        (),
        ["platform.quorum: has no effect without platform.round_timeout_s"],
    ),
    (
        "amqp without a broker",
        BASE + "broker: {provider: none}\n",
        (),
        ["broker.provider: is 'none' but transport is 'amqp'"],
    ),
    (
        "non-positive timeout",
        BASE + "timeouts: {run_s: 0}\n",
        (),
        ["timeouts.run_s: expected a number > 0.0; found 0.0"],
    ),
    (
        "rounds below 1",
        BASE + "rounds: 0\n",
        (),
        ["s.yaml:6: rounds: expected an integer >= 1; found 0"],
    ),
    (
        "bad name",
        BASE.replace("name: t", "name: a/b"),
        (),
        ["name: expected letters, digits, '_', '.' or '-' only; found 'a/b'"],
    ),
    (
        "http fault that does nothing",
        BASE + "platform:\n  faults:\n    http:\n    - {endpoint: upload}\n",
        (),
        ["platform.faults.http[0]: does nothing"],
    ),
    (
        "unknown fault endpoint",
        BASE + "platform:\n  faults:\n    http:\n    - {endpoint: uplod, status: 503}\n",
        (),
        ["s.yaml:9: platform.faults.http[0].endpoint: expected one of *, upload", "'upload'?"],
    ),
    (
        "bad --set path with suggestion",
        BASE,
        ("leaves.cuont=3",),
        ["s.yaml: --set leaves.cuont=3: leaves.cuont: unknown key", "did you mean 'leaves.count'?"],
    ),
    (
        "--set into a scalar",
        BASE,
        ("rounds.max=3",),
        ["--set rounds.max=3: rounds: is an integer, it has no key 'max'"],
    ),
    (
        "--set without a value",
        BASE,
        ("rounds",),
        ["--set rounds: expected key.path=value"],
    ),
    (
        "--set out of range",
        BASE,
        ("leaves.count=0",),
        ["s.yaml (--set leaves.count=0): leaves.count: expected an integer >= 1; found 0"],
    ),
    (
        "bad YAML syntax with line number",
        BASE + "rounds: [1\n",
        (),
        ["s.yaml:7:1: invalid YAML", "started at line 6"],
    ),
    (
        "duplicate key",
        "name: t\nleaves:\n  count: 4\n  count: 5\nmodel:\n  preset: tiny\n",
        (),
        ["s.yaml:4:3: invalid YAML: duplicate key 'count'"],
    ),
    (
        "not a mapping",
        "- a\n- b\n",
        (),
        ["expected a mapping of scenario keys at the top level, found a list"],
    ),
    ("empty file", "", (), ["s.yaml: the file is empty"]),
    ("missing file", None, (), ["s.yaml: no such scenario file"]),
]


@pytest.mark.parametrize(
    ("text", "overrides", "fragments"),
    [b[1:] for b in BROKEN],
    ids=[b[0] for b in BROKEN],
)
def test_broken_scenario_says_what_and_where(
    tmp_path: Path, text: str | None, overrides: tuple[str, ...], fragments: list[str]
) -> None:
    path = tmp_path / "s.yaml" if text is None else _write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scenarios_load_and_are_documented(name: str) -> None:
    path = ROOT / "scenarios" / f"{name}.yaml"
    scenario = load_scenario(path)
    assert scenario.name == name
    assert scenario.source == path
    head = path.read_text().splitlines()[0]
    assert head.startswith(f"# {name}:"), "each scenario says what it tests on its first line"
    text = path.read_text()
    assert "Time here" in text and "Run:" in text and f"bk-sim run scenarios/{name}.yaml" in text
    json.dumps(scenario.to_dict())


def test_shipped_scenarios_match_their_brief() -> None:
    smoke = load_scenario(ROOT / "scenarios/smoke.yaml")
    assert (smoke.leaves.count, smoke.leaves.processes, smoke.rounds) == (8, 2, 2)
    assert smoke.model.preset == "tiny" and smoke.leaves.weighting.distribution == "lognormal"
    assert smoke.transport == "amqp" and smoke.payload.compression == "fast"
    hundred = load_scenario(ROOT / "scenarios/100_leaves.yaml")
    assert hundred.leaves.count == 100 and hundred.model.preset == "mlp_1m"
    assert hundred.rounds == 3
    thousand = load_scenario(ROOT / "scenarios/1000_leaves.yaml")
    assert thousand.leaves.count == 1000 and thousand.model.preset == "tiny"
    strag = load_scenario(ROOT / "scenarios/stragglers_dropouts.yaml")
    assert strag.platform.quorum is not None and strag.platform.round_timeout_s is not None
    assert 0 < strag.leaves.stragglers.delay_s < strag.platform.round_timeout_s
    assert strag.leaves.dropouts.skip_fraction > 0 and strag.leaves.dropouts.die_fraction > 0
    strategies = load_scenario(ROOT / "scenarios/strategies.yaml")
    assert strategies.platform.strategy == "median"
    assert (
        "--set platform.strategy=trimmed_mean" in (ROOT / "scenarios/strategies.yaml").read_text()
    )


def test_minimal_scenario_gets_documented_defaults(tmp_path: Path) -> None:
    s = load_scenario(_write(tmp_path, "leaves: {count: 3}\nmodel: {preset: tiny}\n", "mini.yaml"))
    assert s.name == "mini"  # the file's stem
    assert s.seed == 0 and s.rounds == 1 and s.transport == "amqp"
    assert s.platform.mode == "local" and s.platform.strategy == "fedavg"
    assert s.platform.trim_fraction == 0.1 and s.platform.faults.dedupe is True
    assert s.broker.provider == "auto" and s.payload.compression == "fast"
    assert (s.timeouts.notification_s, s.timeouts.run_s, s.timeouts.leaf_start_s) == (
        120.0,
        1800.0,
        60.0,
    )
    assert s.client.retry.max_retries == 3 and s.client.reconnect.heartbeat == 30
    assert s.validation.rtol is None and s.validation.forensics_sample == 4096
    assert s.report.dir == Path("reports")
    assert s.leaves.weighting.distribution == "fixed" and s.leaves.weighting.value == 1.0
    assert 1 <= s.leaves.effective_processes <= 3


def test_overrides_apply_in_order_and_parse_yaml(tmp_path: Path) -> None:
    s = load_scenario(
        ROOT / "scenarios/100_leaves.yaml",
        ["leaves.count=20", "model.preset=tiny", "validation.atol=1e-6", "rounds=1", "rounds=2"],
    )
    assert s.leaves.count == 20 and s.model.preset == "tiny" and s.rounds == 2
    assert s.validation.atol == 1e-6  # PyYAML reads 1e-6 as a string; numbers accept it
    flow = load_scenario(
        _write(tmp_path, BASE), ["platform.faults.http=[{status: 503, rate: 0.5, count: 2}]"]
    )
    assert flow.platform.faults.http[0].status == 503 and flow.platform.faults.http[0].count == 2


def test_setting_preset_replaces_explicit_layers_and_back(tmp_path: Path) -> None:
    layered = "name: t\nleaves: {count: 2}\nmodel:\n  layers:\n  - {shape: [2, 3], dtype: int16}\n"
    path = _write(tmp_path, layered)
    assert load_scenario(path).model.layers[0].dtype == "int16"
    assert load_scenario(path, ["model.preset=small"]).model.preset == "small"
    back = load_scenario(
        ROOT / "scenarios/smoke.yaml", ["model.layers=[{shape: [4], dtype: uint8}]"]
    )
    assert back.model.preset is None and back.model.layers[0].shape == (4,)


def test_to_dict_is_json_with_paths_as_strings_and_no_secret(tmp_path: Path) -> None:
    creds = [{"id": f"l{i}"} for i in range(4)]
    (tmp_path / "creds.json").write_text(json.dumps(creds))
    s = load_scenario(
        _write(
            tmp_path,
            BASE + "platform:\n  mode: remote\n  host: https://bk.example\n"
            "  credentials_file: creds.json\n  admin_token: hunter2\n"
            "broker:\n  amqp_url: amqp://bk:s3cret@mq.example:5672/\n"
            "  management_url: http://bk:s3cret@mq.example:15672/\n",
        )
    )
    assert s.platform.credentials_file == tmp_path / "creds.json"  # relative to the file
    d = s.to_dict()
    text = json.dumps(d)
    assert "hunter2" not in text and d["platform"]["admin_token"] == "***"
    assert "s3cret" not in text and d["broker"]["amqp_url"] == "amqp://bk:***@mq.example:5672/"
    assert s.broker.amqp_url == "amqp://bk:s3cret@mq.example:5672/"  # the run still has it
    assert d["platform"]["credentials_file"] == str(tmp_path / "creds.json")
    assert d["report"]["dir"] == "reports" and d["source"] == str(tmp_path / "s.yaml")
    assert d["model"]["layers"][0] == {"shape": [16, 32], "dtype": "float32"}


def test_remote_credentials_file_is_checked_early(tmp_path: Path) -> None:
    (tmp_path / "creds.json").write_text(json.dumps([{"id": "only-one"}]))
    text = BASE + "platform: {mode: remote, host: 'https://x', credentials_file: creds.json}\n"
    with pytest.raises(ScenarioError, match=r"holds 1 credentials; expected at least leaves.count"):
        load_scenario(_write(tmp_path, text))
    gone = text.replace("creds.json", "nope.json")
    with pytest.raises(ScenarioError, match="platform.credentials_file: no such file"):
        load_scenario(_write(tmp_path, gone))


def test_scenario_from_dict_validates_like_a_file() -> None:
    s = scenario_from_dict({"name": "x", "leaves": {"count": 2}, "model": {"preset": "tiny"}})
    assert isinstance(s, Scenario) and s.source is None
    with pytest.raises(ScenarioError, match=r"^scenario: leaves.count: expected an integer >= 1"):
        scenario_from_dict({"name": "x", "leaves": {"count": 0}, "model": {"preset": "tiny"}})


def test_presets_have_the_promised_shapes() -> None:
    def count(name: str) -> int:
        return sum(math.prod(shape) for shape, _ in PRESETS[name])

    tiny = PRESETS["tiny"]
    assert 500 <= count("tiny") <= 1500
    assert [d for _, d in tiny if np.dtype(d).kind == "i"] == ["int64"]
    assert 40_000 <= count("small") <= 60_000
    mlp = PRESETS["mlp_1m"]
    assert 900_000 <= count("mlp_1m") <= 1_100_000 and 4 <= len(mlp) <= 6
    assert {d for _, d in mlp} == {"float32"}
    cnn = PRESETS["cnn_small"]
    assert any(len(shape) == 4 for shape, _ in cnn)
    assert any(np.dtype(d).kind == "i" for _, d in cnn) and any(d == "float32" for _, d in cnn)


def test_fault_spec_mirrors_the_platform_faults_api() -> None:
    import dataclasses
    import typing

    from bk_sim.platform import _faults
    from bk_sim.scenario import FaultsSpec, HttpFaultSpec, NotificationFaultSpec

    hints = typing.get_type_hints(HttpFaultSpec)
    assert set(typing.get_args(hints["endpoint"])) == set(_faults.ENDPOINTS)
    mine = {f.name for f in dataclasses.fields(HttpFaultSpec)}
    assert mine == {f.name for f in dataclasses.fields(_faults.HttpFault)}
    notes = {f.name for f in dataclasses.fields(NotificationFaultSpec)}
    assert notes == {f.name for f in dataclasses.fields(_faults.NotificationFaults)}
    aggregation = typing.get_type_hints(FaultsSpec)["aggregation"]
    assert set(typing.get_args(typing.get_args(aggregation)[0])) == set(_faults.AGGREGATION_FAULTS)


def test_cli_check_and_schema(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bk_sim.cli import main

    runner = CliRunner()
    ok = runner.invoke(main, ["scenario", "check", str(ROOT / "scenarios/smoke.yaml")])
    assert ok.exit_code == 0, ok.output
    assert "ok: smoke, 8 leaves in 2 processes, 2 rounds, model tiny (941 parameters" in ok.output
    as_json = runner.invoke(
        main,
        ["scenario", "check", "--json", "--set", "rounds=5", str(ROOT / "scenarios/smoke.yaml")],
    )
    assert as_json.exit_code == 0 and json.loads(as_json.output)["rounds"] == 5
    bad = runner.invoke(main, ["scenario", "check", str(_write(tmp_path, BASE + "rounds: 0\n"))])
    assert bad.exit_code == 2
    assert "rounds: expected an integer >= 1; found 0" in bad.output
    schema = runner.invoke(main, ["scenario", "schema"])
    assert schema.exit_code == 0 and schema.output == scenario_schema_doc()


def test_yaml_alias_cycles_and_alias_explosions_are_scenario_errors(tmp_path: Path) -> None:
    """Both used to escape: a cycle as a RecursionError traceback, nine nested levels of
    ten aliases as a walk over 10**9 values (minutes of CPU)."""
    with pytest.raises(ScenarioError, match="alias refers to a value that contains it"):
        load_scenario(_write(tmp_path, BASE + "extra: &a [*a]\n"))
    laughs = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)
    ]
    with pytest.raises(ScenarioError, match="more than 100,000 values"):
        load_scenario(_write(tmp_path, BASE + "\n".join(laughs) + "\n"))
    shared = BASE.replace("preset: tiny", "layers: [&l {shape: [4], dtype: float32}, *l]")
    assert len(load_scenario(_write(tmp_path, shared)).model.layers) == 2  # plain aliases work
