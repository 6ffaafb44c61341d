"""lesion follow-up: lesions (keyed pseudonyms, one patient each), a study's lesion and visit
date, each prediction's embedding and its comparison with the previous visit (the two follow-up
referral reasons take tiers 0 and 4: the tiers already stored keep their numbers)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 19:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "lesions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("program_id", sa.Integer(), sa.ForeignKey("programs.id"), nullable=False),
        sa.Column("key_pseudonym", sa.String(64), nullable=False),
        sa.Column("patient_pseudonym", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.UniqueConstraint("program_id", "key_pseudonym", name="uq_lesions_program_key"),
    )
    with op.batch_alter_table("studies") as batch:
        batch.add_column(sa.Column("lesion_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_foreign_key("fk_studies_lesion", "lesions", ["lesion_id"], ["id"])
        batch.create_index("ix_studies_lesion_id", ["lesion_id"])
    with op.batch_alter_table("predictions") as batch:
        batch.add_column(sa.Column("embedding", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("previous_study_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("change_measure", sa.Float(), nullable=True))
        batch.add_column(sa.Column("change_percentile", sa.Float(), nullable=True))
        batch.add_column(sa.Column("probability_change", sa.Float(), nullable=True))
        batch.add_column(sa.Column("changed", sa.Boolean(), nullable=True))
        batch.add_column(sa.Column("newly_high_risk", sa.Boolean(), nullable=True))
        batch.create_foreign_key(
            "fk_predictions_previous_study", "studies", ["previous_study_id"], ["id"], ondelete="SET NULL"
        )


def downgrade() -> None:
    # the follow-up reasons become what the rule without follow-up would have said
    op.execute("UPDATE referrals SET category = 'high_risk', tier = 3 WHERE category = 'newly_high_risk'")
    op.execute("DELETE FROM referrals WHERE category = 'changed'")
    with op.batch_alter_table("predictions") as batch:
        batch.drop_constraint("fk_predictions_previous_study", type_="foreignkey")
        for column in ("newly_high_risk", "changed", "probability_change", "change_percentile", "change_measure",
                       "previous_study_id", "embedding"):  # fmt: skip
            batch.drop_column(column)
    with op.batch_alter_table("studies") as batch:
        batch.drop_index("ix_studies_lesion_id")
        batch.drop_constraint("fk_studies_lesion", type_="foreignkey")
        batch.drop_column("acquired_at")
        batch.drop_column("lesion_id")
    op.drop_table("lesions")
