"""Rollouts: plans and their state, the devices each one targets, and the timeline.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controller.db.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("version_id", sa.String(36),
                  sa.ForeignKey("model_versions.id", ondelete="RESTRICT"), nullable=False),
        sa.Column("selector", JSON, nullable=False),
        sa.Column("classes", JSON, nullable=False),
        sa.Column("stages", JSON, nullable=False),
        sa.Column("gates", JSON, nullable=False),
        sa.Column("on_failure", sa.String(16), nullable=False),
        sa.Column("max_concurrent", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("entered_at", UTCDateTime(), nullable=False),
        sa.Column("paused_from", sa.String(16), nullable=True),
        sa.Column("inconclusive_since", UTCDateTime(), nullable=True),
        sa.Column("baseline", JSON, nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
    )
    op.create_index("ix_rollouts_state", "rollouts", ["state"])
    op.create_table(
        "rollout_members",
        sa.Column("rollout_id", sa.String(36), sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("cls", sa.String(160), nullable=False),
        sa.Column("variant", sa.String(64), nullable=False),
        sa.Column("joined_at", UTCDateTime(), nullable=False),
        sa.Column("left_at", UTCDateTime(), nullable=True),
        sa.Column("assigned_stage", sa.Integer(), nullable=True),
        sa.Column("assigned_at", UTCDateTime(), nullable=True),
        sa.Column("generation", sa.BigInteger(), nullable=True),
        sa.Column("previous", JSON, nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("reason", sa.Text(), nullable=False, server_default=""),
        sa.Column("revert_generation", sa.BigInteger(), nullable=True),
        sa.Column("reverted_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_rollout_members_device", "rollout_members", ["device_id"])
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("rollout_id", sa.String(36), sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("stage", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("figures", JSON, nullable=True),
    )
    op.create_index("ix_rollout_events_rollout", "rollout_events", ["rollout_id", "id"])


def downgrade() -> None:
    op.drop_index("ix_rollout_events_rollout", table_name="rollout_events")
    op.drop_table("rollout_events")
    op.drop_index("ix_rollout_members_device", table_name="rollout_members")
    op.drop_table("rollout_members")
    op.drop_index("ix_rollouts_state", table_name="rollouts")
    op.drop_table("rollouts")
