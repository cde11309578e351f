"""Leadership: one holder per database schema; it passes on when the holder lets go."""

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from controller.db.engine import make_engine
from controller.leader import Leadership
from tests.conftest import PG_URL, _pg_schema_url, unavailable


@pytest.fixture
def pg_urls() -> Iterator[tuple[str, str]]:
    """Two schemas of one PostgreSQL database."""
    if not PG_URL:
        unavailable("PostgreSQL (EDGEFLEET_TEST_DATABASE_URL)")
    for first in _pg_schema_url(PG_URL):  # type: ignore[arg-type]
        for second in _pg_schema_url(PG_URL):  # type: ignore[arg-type]
            yield first, second


def test_one_replica_leads_per_schema_and_hands_over(pg_urls: tuple[str, str]) -> None:
    engines = [make_engine(pg_urls[0]), make_engine(pg_urls[0]), make_engine(pg_urls[1])]
    a, b, elsewhere = (Leadership(e) for e in engines)
    try:
        assert a.held()
        assert a.taken_over
        assert not b.held()
        assert elsewhere.held()  # another deployment in another schema is not blocked
        assert a.held()  # still leading on the next tick
        a.release()
        assert b.held()
    finally:
        for leader in (a, b, elsewhere):
            leader.release()
        for engine in engines:
            engine.dispose()


def test_sqlite_is_always_one_controller(tmp_path: object) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    assert Leadership(engine).held()
    engine.dispose()
