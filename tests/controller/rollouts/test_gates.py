"""Gate evaluation: each gate fails on its own, per class as well as overall."""

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from controller.rollouts.gates import (
    ALL,
    FAILED,
    INCONCLUSIVE,
    SUCCESSFUL,
    Aggregate,
    Figures,
    Member,
    baseline,
    evaluate,
)
from controller.rollouts.plan import Gates
from shared.messages import InstallState

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
GATES = Gates(min_requests=20)
HEALTHY = Figures(requests=100, errors=0, latency_p95_ms=10.0, mem_used_bytes=1 << 30)


def as_outcome(outcome: str) -> InstallState | None:
    """The fakes keep outcomes as words; the gates take "pending" as None."""
    return None if outcome == "pending" else InstallState(outcome)


def member(i: int, cls: str = "a", *, outcome: str = "committed", reason: str = "",
           health: Figures | None = HEALTHY, ago: float = 60) -> Member:
    return Member(f"d{i}", cls, NOW - timedelta(seconds=ago), as_outcome(outcome), reason,
                  health if outcome == "committed" else None)


BASE = baseline([("a", HEALTHY), ("b", HEALTHY)] * 3, GATES)


def test_healthy_canaries_pass() -> None:
    ev = evaluate([member(i) for i in range(5)], BASE, GATES, now=NOW, health=True)
    assert ev.verdict == SUCCESSFUL, ev.reasons
    assert ev.figures[ALL]["committed"] == 5


def test_install_failures_over_the_rate_fail() -> None:
    ms = [member(0, outcome="failed", reason="download_refused: x")] + [member(i)
                                                                         for i in range(1, 5)]
    ev = evaluate(ms, BASE, GATES, now=NOW, health=False)
    assert ev.verdict == FAILED
    assert "install failures in the fleet: 1 of 5 (20% > 10%)" in ev.reasons


def test_one_smoke_test_failure_fails() -> None:
    ms = [member(0, outcome="rolled_back", reason="smoke_test_failed: output 3 differs")] + [
        member(i) for i in range(1, 20)]
    ev = evaluate(ms, BASE, GATES, now=NOW, health=False)
    assert ev.verdict == FAILED
    assert any("smoke test failed on 1 of 20" in r and "output 3 differs" in r
               for r in ev.reasons)


def test_devices_that_never_report_fail_after_the_timeout() -> None:
    ms = [member(0, outcome="pending", ago=GATES.report_timeout_s + 1)] + [
        member(i) for i in range(1, 5)]
    ev = evaluate(ms, BASE, GATES, now=NOW, health=False)
    assert ev.verdict == FAILED
    assert any("no report from 1 of 5" in r for r in ev.reasons)
    waiting = [member(0, outcome="pending", ago=10)] + [member(i) for i in range(1, 5)]
    assert evaluate(waiting, BASE, GATES, now=NOW, health=False).verdict == SUCCESSFUL


def test_error_rate_latency_and_memory_regressions_fail() -> None:
    for bad, says in [(Figures(100, 20, 10.0, 1 << 30), "error rate in class a: at least +"),
                      (Figures(100, 0, 30.0, 1 << 30), "latency p95"),
                      (Figures(100, 0, 10.0, 2 << 30), "memory")]:
        ev = evaluate([member(i, health=bad) for i in range(3)], BASE, GATES, now=NOW,
                      health=True)
        assert ev.verdict == FAILED, says
        assert any(r.startswith(says) for r in ev.reasons), ev.reasons


def test_a_latency_ratio_without_the_minimum_effect_passes() -> None:
    """2 ms -> 4 ms is 2x, and what a busy scheduler does to a tiny model: not a
    regression until p95 also grows by ``min_latency_increase_ms``."""
    base = baseline([("a", Figures(100, 0, 2.0, 1 << 30))] * 3, GATES)
    jitter = Figures(100, 0, 4.0, 1 << 30)
    ev = evaluate([member(i, health=jitter) for i in range(3)], base, GATES, now=NOW,
                  health=True)
    assert ev.verdict == SUCCESSFUL, ev.reasons
    assert ev.figures["a"]["comparison"]["latency_p95_increase_ms"] == 2.0
    strict = replace(GATES, min_latency_increase_ms=1.0)
    ev = evaluate([member(i, health=jitter) for i in range(3)], base, strict, now=NOW,
                  health=True)
    assert ev.verdict == FAILED
    assert "latency p95 in class a: 2.00x the baseline, +2 ms (> 1.5x and >= 1 ms)" in \
        ev.reasons


def test_a_regression_confined_to_one_class_fails_while_the_average_passes() -> None:
    slow = Figures(100, 0, 20.0, 1 << 30)  # 2x slower, on class b only
    ms = [member(i, "a") for i in range(9)] + [member(9, "b", health=slow)]
    ev = evaluate(ms, BASE, GATES, now=NOW, health=True)
    assert ev.figures[ALL]["verdict"] == SUCCESSFUL  # the median hides it
    assert ev.figures["b"]["verdict"] == FAILED
    assert ev.verdict == FAILED
    assert any("class b" in r and "latency p95" in r for r in ev.reasons)


def test_too_few_requests_is_inconclusive() -> None:
    quiet = Figures(5, 0, 10.0, 1 << 30)
    ev = evaluate([member(i, health=quiet) for i in range(3)], BASE, GATES, now=NOW, health=True)
    assert ev.verdict == INCONCLUSIVE
    assert ev.reasons == ["waiting for traffic in class a: 0 of 3 canaries served 20 requests "
                          "on the target (the gate needs 1; idle devices need a plan with "
                          "probes)"]
    probed = evaluate([member(i, health=quiet) for i in range(3)], BASE, GATES, now=NOW,
                      health=True, probes=True)
    assert probed.reasons == ["waiting for probes in class a: 0 of 3 canaries ran 20 probes "
                              "on the target (the gate needs 1)"]


def test_with_probes_the_figures_are_the_probes_not_the_traffic() -> None:
    health = {"inference_count": 3, "error_count": 3, "latency_p95_ms": 900.0,
              "probe_count": 40, "probe_error_count": 1, "probe_latency_p95_ms": 2.5,
              "model_rss_bytes": 7 << 20}
    assert Figures.of(health) == Figures(3, 3, 900.0, 7 << 20)
    assert Figures.of(health, probes=True) == Figures(40, 1, 2.5, 7 << 20)


def test_a_worker_that_is_not_running_has_no_memory_figure_not_the_hosts() -> None:
    """An agent whose worker died (out of memory) reports no worker memory: the host's
    use is not the model's (it once read as 36x the baseline)."""
    down = {"inference_count": 10, "error_count": 6, "mem_used_bytes": 3 << 30,
            "agent_rss_bytes": 60 << 20}
    assert Figures.of(down) == Figures(10, 6, None, None)
    older = {"inference_count": 10, "error_count": 0, "mem_used_bytes": 3 << 30}
    assert Figures.of(older) == Figures(10, 0, None, 3 << 30)  # all an old agent says
    canary = Aggregate.of([Figures(10, 6, 5.0, None), Figures(10, 0, 5.0, 200 << 20)])
    assert canary.mem_used_bytes == 200 << 20  # the median of the figures there are


def test_no_baseline_to_compare_with_does_not_block() -> None:
    ev = evaluate([member(i) for i in range(3)], {}, GATES, now=NOW, health=True)
    assert ev.verdict == SUCCESSFUL


def test_one_unlucky_error_in_a_few_requests_is_not_a_regression() -> None:
    unlucky = Figures(20, 2, 10.0, 1 << 30)  # 10% measured, on 20 requests
    ev = evaluate([member(0, health=unlucky)], BASE, GATES, now=NOW, health=True)
    assert ev.verdict == SUCCESSFUL, ev.reasons
    real = Figures(200, 40, 10.0, 1 << 30)  # 20% on 200 requests
    ev = evaluate([member(0, health=real)], BASE, GATES, now=NOW, health=True)
    assert ev.verdict == FAILED
