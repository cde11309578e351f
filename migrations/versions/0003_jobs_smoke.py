"""Background jobs; smoke tests, labels and variant comparisons.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from controller.db.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("version_id", sa.String(36),
                  sa.ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.String(512), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=True),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_version_id", "jobs", ["version_id"])
    with op.batch_alter_table("model_versions") as t:
        t.add_column(sa.Column("labels", JSON, nullable=False, server_default="{}"))
        t.add_column(sa.Column("smoke_test", JSON, nullable=True))
    with op.batch_alter_table("variants") as t:
        t.add_column(sa.Column("derived_from", sa.String(64), nullable=True))
        t.add_column(sa.Column("comparison", JSON, nullable=True))
        t.add_column(sa.Column("expected", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("variants") as t:
        t.drop_column("expected")
        t.drop_column("comparison")
        t.drop_column("derived_from")
    with op.batch_alter_table("model_versions") as t:
        t.drop_column("smoke_test")
        t.drop_column("labels")
    op.drop_index("ix_jobs_version_id", table_name="jobs")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.drop_table("jobs")
