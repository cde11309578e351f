"""Derivation as the pusher asked for it: samples, declared inputs, variants, a quality
floor; the variants that were refused and why; memory measured per variant; smoke tests
as blobs of their own (signed as targets of their own), which replace the expected
outputs kept inline on each variant. Versions pushed before this revision keep their
variants but no longer carry a smoke test to devices; push them again to get one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as t:
        t.add_column(sa.Column("samples_sha256", sa.String(64), nullable=True))
        t.add_column(sa.Column("derive_options", JSON, nullable=False, server_default="{}"))
        t.add_column(sa.Column("refused", JSON, nullable=False, server_default="[]"))
    with op.batch_alter_table("variants") as t:
        t.add_column(sa.Column("ram_measured", sa.Boolean(), nullable=False,
                               server_default=sa.false()))
        t.add_column(sa.Column("smoke_sha256", sa.String(64), nullable=True))
        t.add_column(sa.Column("smoke_size", sa.BigInteger(), nullable=True))
        t.drop_column("expected")


def downgrade() -> None:
    with op.batch_alter_table("variants") as t:
        t.add_column(sa.Column("expected", JSON, nullable=True))
        t.drop_column("smoke_size")
        t.drop_column("smoke_sha256")
        t.drop_column("ram_measured")
    with op.batch_alter_table("model_versions") as t:
        t.drop_column("refused")
        t.drop_column("derive_options")
        t.drop_column("samples_sha256")
