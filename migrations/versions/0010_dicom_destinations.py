"""DICOM destinations per program and the delivery of results to them (and, per program, for
studies that did not arrive by DICOM)

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 12:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("programs") as batch:
        batch.add_column(sa.Column("dicom_results_for_all", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "dicom_destinations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("program_id", sa.Integer(), sa.ForeignKey("programs.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("ae_title", sa.String(16), nullable=True),
        sa.Column("tls", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("url", sa.String(2000), nullable=True),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("secret_encrypted", sa.LargeBinary(), nullable=True),
        sa.Column("enabled", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.UniqueConstraint("program_id", "name", name="uq_dicom_destinations_program_name"),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False),
        sa.Column(
            "destination_id",
            sa.Integer(),
            sa.ForeignKey("dicom_destinations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("object", sa.String(16), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("detail", sa.String(500), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.UniqueConstraint("study_id", "destination_id", "object", name="uq_deliveries_study_destination_object"),
    )
    op.create_index("ix_deliveries_study_id", "deliveries", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_study_id", "deliveries")
    op.drop_table("deliveries")
    op.drop_table("dicom_destinations")
    with op.batch_alter_table("programs") as batch:
        batch.drop_column("dicom_results_for_all")
