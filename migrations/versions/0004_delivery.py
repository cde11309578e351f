"""Delivery: each device's desired and reported state, and its install events.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controller.db.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("devices") as t:
        t.add_column(sa.Column("desired_generation", sa.BigInteger(), nullable=False,
                               server_default="0"))
        t.add_column(sa.Column("desired", JSON, nullable=True))
        t.add_column(sa.Column("reported", JSON, nullable=True))
    op.create_table(
        "device_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("device_id", sa.String(64),
                  sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index("ix_device_events_device_id", "device_events", ["device_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_device_events_device_id", table_name="device_events")
    op.drop_table("device_events")
    with op.batch_alter_table("devices") as t:
        t.drop_column("reported")
        t.drop_column("desired")
        t.drop_column("desired_generation")
