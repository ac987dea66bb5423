"""How many of each payload variant's uploads an aggregate counted, from fitted weights."""

from __future__ import annotations

from bk_sim.load._rounds import _counts


def test_one_of_two_identical_uploads_dropped() -> None:
    # variant 0 uploaded twice, variant 2 once; the aggregate has only variant 0 at the
    # weight of two uploads... or one: the fewest changes explain it (variant 2 dropped)
    assert _counts({0: 1.0, 2: 0.0}, {0: 2, 2: 1}) == {0: 2, 2: 0}


def test_a_double_counted_upload() -> None:
    assert _counts({0: 1.0, 1: 2.0, 2: 1.0}, {0: 1, 1: 1, 2: 1}) == {0: 1, 1: 2, 2: 1}


def test_an_unexplained_fit_gives_no_counts() -> None:
    assert _counts({0: 1.0, 1: 0.37, 2: 0.61}, {0: 1, 1: 1, 2: 1}) is None


def test_a_correct_round_counts_every_upload() -> None:
    assert _counts({0: 0.5, 1: 0.25, 2: 0.25}, {0: 2, 1: 1, 2: 1}) == {0: 2, 1: 1, 2: 1}
