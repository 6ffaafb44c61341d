"""a program's own referral threshold for a bundle, set from its local validation

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05 19:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "program_thresholds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("program_id", sa.Integer(), nullable=False),
        sa.Column("bundle_version", sa.String(length=80), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("basis", sa.JSON(), nullable=True),
        sa.Column("set_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("set_by_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["bundle_version"], ["model_bundles.version"],
            name=op.f("fk_program_thresholds_bundle_version_model_bundles"),
        ),
        sa.ForeignKeyConstraint(
            ["program_id"], ["programs.id"], name=op.f("fk_program_thresholds_program_id_programs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["set_by_id"], ["users.id"], name=op.f("fk_program_thresholds_set_by_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_program_thresholds")),
        sa.UniqueConstraint("program_id", "bundle_version", name=op.f("uq_program_thresholds_program_id")),
    )  # fmt: skip


def downgrade() -> None:
    op.drop_table("program_thresholds")
