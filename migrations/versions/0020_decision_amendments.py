"""decisions can be amended: the earlier versions of a decision, with who amended it and why

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DECISIONS = (
    "urgent_in_person_review",
    "biopsy_or_excision",
    "routine_follow_up",
    "benign_no_action",
    "image_quality_insufficient",
)


def upgrade() -> None:
    op.create_table(
        "decision_amendments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("referral_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.Enum(*DECISIONS, name="decision", native_enum=False, create_constraint=True, length=32), nullable=False),
        sa.Column("specialist_diagnosis", sa.String(length=16), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("decided_by_id", sa.Integer(), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("amended_by_id", sa.Integer(), nullable=True),
        sa.Column("amended_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["referral_id"], ["referrals.id"], name=op.f("fk_decision_amendments_referral_id_referrals"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["decided_by_id"], ["users.id"], name=op.f("fk_decision_amendments_decided_by_id_users")),
        sa.ForeignKeyConstraint(["amended_by_id"], ["users.id"], name=op.f("fk_decision_amendments_amended_by_id_users")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_decision_amendments")),
    )  # fmt: skip
    op.create_index(op.f("ix_decision_amendments_referral_id"), "decision_amendments", ["referral_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_decision_amendments_referral_id"), table_name="decision_amendments")
    op.drop_table("decision_amendments")
