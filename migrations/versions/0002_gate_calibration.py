"""not-assessable gate on predictions, referral categories, a program's expected prevalence

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 07:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("assessable", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch.add_column(sa.Column("not_assessable_reason", sa.String(length=120), nullable=True))
        batch.add_column(sa.Column("feature_distance", sa.Float(), nullable=True))
    with op.batch_alter_table("referrals") as batch:
        batch.add_column(sa.Column("category", sa.String(length=20), server_default="high_risk", nullable=False))
    with op.batch_alter_table("programs") as batch:
        batch.add_column(sa.Column("expected_prevalence", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("programs") as batch:
        batch.drop_column("expected_prevalence")
    with op.batch_alter_table("referrals") as batch:
        batch.drop_column("category")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_column("feature_distance")
        batch.drop_column("not_assessable_reason")
        batch.drop_column("assessable")
