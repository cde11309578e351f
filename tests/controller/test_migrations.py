"""Alembic owns the schema: upgrade, downgrade and upgrade again on both databases."""

import sqlalchemy as sa
from alembic.script import ScriptDirectory

from controller.db.engine import MIGRATIONS_DIR, downgrade, make_engine, upgrade

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
        assert version == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
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


def test_a_desired_state_stored_before_0007_is_signed_as_it_was(db_url: str) -> None:
    from controller.db.models import Device
    from controller.delivery import desired_state

    engine = make_engine(db_url)
    try:
        downgrade(engine, "base")
        upgrade(engine, "0006")
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO devices (id, name, labels, mqtt_secret_hash, enrolled_at, status, "
                "health_count, desired_generation, desired) VALUES ('d1', 'd1', '{}', 'x', "
                "'2026-12-01 00:00:00', 'online', 0, 3, :desired)"), {"desired": (
                    '{"issued_at": "2026-12-01T00:00:00+00:00", "model": "m", '
                    '"version": "1.0.0", "variant": "int8", '
                    '"target": "models/m/1.0.0/int8.onnx"}')})
        upgrade(engine)
        with sa.orm.Session(engine) as session:
            desired = desired_state(session.get(Device, "d1"))
        assert desired is not None
        assert (desired.device_id, desired.generation, desired.variant, desired.rollback) == (
            "d1", 3, "int8", False)
    finally:
        engine.dispose()
