"""End to end on a real loopback platform: synthetic sites upload their FA payloads, the
judge checks the downloaded aggregate and the round record's derived statistics. An
honest round passes; each analytics fault fails with forensics naming the leaf or field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bk_sim.platform import PlatformHandle
from bk_sim.synth import TabularSpec, field_ops, site_columns, site_fields, site_payload
from bk_sim.validate import AnalyticsJudgement, judge_analytics
from tests.conftest import PlatformFactory
from tests.integration._fa_support import download_fields, fa_archive, post_fa
from tests.integration._platform_support import make_branch

SPEC = TabularSpec(seed=21, columns=6, rows_median=400, rows_min=30, nan_fraction=0.1)
SITES = 4


@pytest.fixture(scope="module")
def platform(platform_factory: PlatformFactory) -> PlatformHandle:
    return platform_factory(no_amqp=True)


def _judged_round(
    platform: PlatformHandle, fault: str | None
) -> tuple[AnalyticsJudgement, dict[str, object], dict[str, str]]:
    with make_branch(platform, SITES, field_ops=field_ops(SPEC)) as b:
        if fault is not None:
            b.admin.set_faults(b.branch_id, {"analytics": fault})
        for s in range(SITES):
            resp = post_fa(platform.url, b.leaves[s], fa_archive(site_payload(SPEC, s)))
            assert resp.status_code == 201, resp.text
        record = b.wait(1)
        assert record["status"] == "aggregated", record
        aggregate = download_fields(platform.url, b.leaves[0], record["aggregation_id"])
        names = {leaf["id"]: leaf["name"] for leaf in b.leaves}
        site_of = {leaf["id"]: s for s, leaf in enumerate(b.leaves)}

        def sites() -> Iterator[tuple[str, dict[str, object], dict[str, object]]]:
            for upload in record["uploads"]:  # the uploads the platform says it combined
                s = site_of[upload["leaf_id"]]
                cols = site_columns(SPEC, s)
                yield names[upload["leaf_id"]], cols, site_fields(SPEC, s, cols)

        verdict = judge_analytics(
            sites(),  # type: ignore[arg-type]
            aggregate,
            field_ops=field_ops(SPEC),
            derived=record["analytics"]["derived"],
        )
        return verdict, record["fault"], names


def test_an_honest_platform_round_passes(platform: PlatformHandle) -> None:
    verdict, _, _ = _judged_round(platform, None)
    assert verdict.passed, verdict.summary()


@pytest.mark.parametrize("fault", ["drop_leaf", "double_count", "nan_poisoned", "mean_of_means"])
def test_each_analytics_fault_is_caught_with_forensics(
    platform: PlatformHandle, fault: str
) -> None:
    verdict, record_fault, names = _judged_round(platform, fault)
    assert not verdict.passed
    forensics = verdict.forensics
    summary = verdict.summary()
    if fault in ("drop_leaf", "double_count"):
        victim = names[str(record_fault["victim_leaf_id"])]  # type: ignore[index]
        assert [f.leaf for f in forensics if f.leaf] == [victim], summary
        assert victim in summary.splitlines()[1]
    elif fault == "nan_poisoned":
        assert [f.field for f in forensics] == [record_fault["victim_field"]], summary  # type: ignore[index]
    else:
        assert {f.check for f in forensics} == {"mean_of_means"}
        assert all(f.column for f in forensics)


def test_two_rounds_of_fresh_site_data_both_pass(platform: PlatformHandle) -> None:
    """Round r uploads the round's redrawn values (same sites); each round is judged."""
    with make_branch(platform, SITES, field_ops=field_ops(SPEC)) as b:
        for rnd in (1, 2):
            for s in range(SITES):
                data = fa_archive(site_payload(SPEC, s, round=rnd))
                assert post_fa(platform.url, b.leaves[s], data).status_code == 201
            record = b.wait(rnd)
            assert record["round"] == rnd and record["status"] == "aggregated"
            aggregate = download_fields(platform.url, b.leaves[0], record["aggregation_id"])
            site_of = {leaf["id"]: s for s, leaf in enumerate(b.leaves)}
            sites = []
            for upload in record["uploads"]:
                s = site_of[upload["leaf_id"]]
                cols = site_columns(SPEC, s, rnd)
                sites.append((f"site-{s}", cols, site_fields(SPEC, s, cols)))
            verdict = judge_analytics(
                sites,
                aggregate,
                field_ops=field_ops(SPEC),
                derived=record["analytics"]["derived"],
            )
            assert verdict.passed, verdict.summary()
