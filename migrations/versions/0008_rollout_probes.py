"""A rollout plan can ask for probes (``controller.rollouts.plan.Probes``): idle devices
exercise their model while a stage bakes, and the gates judge the probes' figures.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("rollouts", sa.Column("probes", sa.JSON().with_variant(JSONB(), "postgresql"),
                                        nullable=True))


def downgrade() -> None:
    op.drop_column("rollouts", "probes")
