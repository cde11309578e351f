"""``agent.fetcher.Pace``: how long a blob download waits for its next chunk."""

from agent.fetcher import Pace


def steady(pace: Pace, gap: float, count: int, start: float = 0.0) -> float:
    now = start
    pace.asked(now)
    for _ in range(count):
        now += gap
        pace.arrived(now)
    return now


def test_before_any_chunk_it_waits_the_first_timeout() -> None:
    assert Pace(floor=3.0, first=10.0, cap=30.0).timeout() == 10.0


def test_on_a_fast_link_it_keeps_the_floor() -> None:
    pace = Pace(floor=3.0, first=10.0, cap=30.0)
    steady(pace, 0.01, 50)
    assert pace.timeout() == 3.0


def test_on_a_slow_link_it_follows_the_gaps_between_chunks() -> None:
    """4 s a chunk (256 KiB at 512 kbit/s): a 3 s timeout would miss every chunk."""
    pace = Pace(floor=3.0, first=10.0, cap=30.0)
    steady(pace, 4.0, 20)
    assert 4.0 < pace.timeout() < 8.0
    jittery = Pace(floor=3.0, first=10.0, cap=30.0)
    now = 0.0
    jittery.asked(now)
    for i in range(20):
        now += 4.0 if i % 2 else 6.0
        jittery.arrived(now)
    assert jittery.timeout() > pace.timeout()  # variation widens it


def test_misses_double_it_up_to_the_cap_and_an_arrival_restores_it() -> None:
    pace = Pace(floor=3.0, first=10.0, cap=30.0)
    now = steady(pace, 4.0, 20)
    settled = pace.timeout()
    pace.missed()
    assert pace.timeout() == 2 * settled
    for _ in range(5):
        pace.missed()
    assert pace.timeout() == 30.0
    pace.arrived(now + 60)  # after the misses: not a sample of the link (Karn)
    assert pace.timeout() == settled
