"""Alembic owns the schema: upgrade, downgrade and upgrade again on both databases."""

import sqlalchemy as sa

from controller.db.engine import downgrade, make_engine, upgrade

TABLES = {"api_tokens", "enroll_tokens", "devices", "health_batches", "audit_log",
          "models", "model_versions", "variants", "jobs",
          "device_events", "rollouts", "rollout_members", "rollout_events"}


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_and_downgrade_round_trip(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert _tables(engine) == TABLES
        downgrade(engine, "base")
        assert _tables(engine) == set()
        upgrade(engine)
        assert _tables(engine) == TABLES
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == "0006"
    finally:
        engine.dispose()


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from controller.db.models import Base

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
