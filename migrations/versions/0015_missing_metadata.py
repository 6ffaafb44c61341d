"""missing metadata: which fields a prediction was made without; a program may require metadata

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("missing_fields", sa.JSON(), nullable=True))
    with op.batch_alter_table("programs") as batch:
        batch.add_column(sa.Column("require_metadata", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("programs") as batch:
        batch.drop_column("require_metadata")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("missing_fields")
