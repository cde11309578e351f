"""Plans: stage syntax and checks, device classes, stratified deterministic canaries."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.rollouts.plan import (
    Gates,
    PlanError,
    Stage,
    canary_order,
    check_stages,
    parse_stages,
    stage_size,
)


def test_parse_stages_reads_percents_counts_and_bake_times() -> None:
    assert parse_stages("1%:10m,5:30s,50%:1h,100%") == [
        Stage(percent=1, bake_s=600), Stage(count=5, bake_s=30), Stage(percent=50, bake_s=3600),
        Stage(percent=100)]


@pytest.mark.parametrize(("stages", "field", "says"), [
    ("10%,5%,100%", "stages[1]", "percentages must increase"),
    ("10%,50%", "stages[1]", "the last stage must be 100%"),
    ("abc", "stages[0]", "neither a percent"),
    ("10%:soon,100%", "stages[0]", "not a duration"),
    ("0%,100%", "stages[0]", "out of range"),
    ("150%", "stages[0]", "out of range"),
])
def test_invalid_stages_name_the_stage_that_is_wrong(stages: str, field: str, says: str) -> None:
    with pytest.raises(PlanError, match=says) as caught:
        check_stages(parse_stages(stages), Gates())
    assert caught.value.field == field


def test_unknown_or_negative_gates_are_refused_by_name() -> None:
    with pytest.raises(PlanError, match="unknown gate") as caught:
        Gates.of({"max_error": 1})
    assert caught.value.field == "gates.max_error"
    with pytest.raises(PlanError, match=">= 0"):
        Gates.of({"max_latency_p95_ratio": -1})
    assert Gates.of({"min_requests": 5.0}).min_requests == 5


def test_the_first_stage_holds_every_class() -> None:
    assert stage_size(Stage(percent=1), total=1000, classes=4, first=True) == 10
    assert stage_size(Stage(percent=1), total=100, classes=4, first=True) == 4
    assert stage_size(Stage(percent=1), total=100, classes=4, first=False) == 1
    assert stage_size(Stage(count=500), total=100, classes=4, first=False) == 100


members = st.lists(st.tuples(st.from_regex(r"d[0-9a-f]{6}", fullmatch=True),
                             st.sampled_from(["a", "b", "c", "d"])),
                   min_size=1, max_size=80, unique_by=lambda m: m[0])


@given(members, st.text(min_size=1, max_size=8))
def test_canary_order_puts_one_of_every_class_first(ms: list[tuple[str, str]], rid: str) -> None:
    order = canary_order(rid, ms)
    cls = dict(ms)
    classes = set(cls.values())
    assert sorted(order) == sorted(cls)
    assert {cls[d] for d in order[:len(classes)]} == classes


@given(members)
def test_canary_order_is_deterministic_and_proportional(ms: list[tuple[str, str]]) -> None:
    order = canary_order("r1", ms)
    assert order == canary_order("r1", list(reversed(ms)))
    cls = dict(ms)
    sizes = {c: sum(1 for v in cls.values() if v == c) for c in set(cls.values())}
    for k in range(1, len(order) + 1):  # no class is ahead of its share by more than one
        for c, n in sizes.items():
            taken = sum(cls[d] == c for d in order[:k])
            assert taken <= k * n / len(order) + 1 + 1e-9 or taken == 1
