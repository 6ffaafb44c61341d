"""the specialist's workspace: the specialist's diagnosis, the suspected diagnosis, hand-overs
(assignment, second opinion) and the decision's callback

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 19:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    ("specialist_diagnosis", sa.String(length=16)),
    ("suspected", sa.String(length=8)),
    ("assigned_at", sa.DateTime(timezone=True)),
    ("assignment_kind", sa.String(length=16)),
    ("assignment_note", sa.Text()),
    ("callback_status", sa.String(length=40)),
)


def upgrade() -> None:
    with op.batch_alter_table("referrals") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind, nullable=True))
        for name in ("assigned_to_id", "assigned_by_id"):
            batch.add_column(sa.Column(name, sa.Integer(), nullable=True))
            batch.create_foreign_key(op.f(f"fk_referrals_{name}_users"), "users", [name], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("referrals") as batch:
        for name in ("assigned_by_id", "assigned_to_id"):
            batch.drop_constraint(op.f(f"fk_referrals_{name}_users"), type_="foreignkey")
            batch.drop_column(name)
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
