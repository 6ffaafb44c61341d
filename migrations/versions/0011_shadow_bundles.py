"""shadow bundles and monitoring: a bundle may score in shadow (never deciding) or be retired;
predictions say whether they were made in shadow and keep the image statistics drift is measured on

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 12:35:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_bundles") as batch:
        batch.add_column(sa.Column("shadow", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("shadow", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column("image_stats", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("image_stats")
        batch.drop_column("shadow")
    with op.batch_alter_table("model_bundles") as batch:
        batch.drop_column("retired_at")
        batch.drop_column("shadow")
