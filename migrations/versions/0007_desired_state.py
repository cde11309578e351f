"""Each device's desired state is stored as the ``shared.messages.DesiredState`` that is
signed (with its device id, generation and rollback flag), not as loose fields that a
second step rebuilt the message from (and lost the rollback flag in).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
devices = sa.table("devices", sa.column("id", sa.String), sa.column("desired", JSON),
                   sa.column("desired_generation", sa.BigInteger))


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(sa.select(devices.c.id, devices.c.desired, devices.c.desired_generation)
                        .where(devices.c.desired.is_not(None))).all()
    for device_id, desired, generation in rows:
        full = {"v": 1, "device_id": device_id, "generation": generation, "rollback": False,
                **desired}
        bind.execute(devices.update().where(devices.c.id == device_id).values(desired=full))


def downgrade() -> None:
    pass  # the fields added are ones the old code ignores
