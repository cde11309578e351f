"""Initial schema: tokens, enrolment tokens, devices, health batches, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controller.db.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "enroll_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("uses_left", sa.Integer(), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("created_by", sa.String(128), nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("mqtt_secret_hash", sa.String(64), nullable=False),
        sa.Column("enrolled_at", UTCDateTime(), nullable=False),
        sa.Column("enroll_token_id", sa.String(36), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("status_since", UTCDateTime(), nullable=True),
        sa.Column("last_seen_at", UTCDateTime(), nullable=True),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("capabilities", JSON, nullable=True),
        sa.Column("last_health", JSON, nullable=True),
        sa.Column("health_count", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "health_batches",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("received_from", UTCDateTime(), nullable=False),
        sa.Column("received_to", UTCDateTime(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("reports", sa.Text(), nullable=False),
    )
    op.create_index("ix_health_batches_received_to", "health_batches", ["received_to"])
    op.create_table(
        "audit_log",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("remote", sa.String(64), nullable=True),
        sa.Column("detail", JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_index("ix_health_batches_received_to", table_name="health_batches")
    op.drop_table("health_batches")
    op.drop_table("devices")
    op.drop_table("enroll_tokens")
    op.drop_table("api_tokens")
