"""Helpers shared by tests: reading HAM10000 studies, counting rows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import func, select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Program, Referral, Study, StudyStatus
from dermascan.ingest import manifest


def store(settings, program_id: int, inputs, **options):
    """SubmitStudies in one transaction (no enqueue): what the doors store."""
    from dermascan.intake.submission import SubmitStudies

    with session_factory(settings.database_url)() as session, session.begin():
        return SubmitStudies(settings, program_id, inputs, source="test", **options).run(session)


def ham_inputs(ham: Path, n: int, offset: int = 0):
    inputs, rejected = manifest.from_isic_layout(ham, limit=n, offset=offset)
    assert not rejected, rejected
    return inputs


def program_id(settings, name: str = "test-program") -> int:
    from dermascan.security.identity import get_or_create_program

    with session_factory(settings.database_url)() as session, session.begin():
        return get_or_create_program(session, name).id


def status_counts(settings, batch_id: str | None = None) -> dict:
    with session_factory(settings.database_url)() as session:
        query = select(Study.status, func.count()).group_by(Study.status)
        if batch_id:
            query = query.where(Study.batch_id == batch_id)
        return {StudyStatus(s).value: n for s, n in session.execute(query)}


def all_done(settings, total: int, batch_id: str | None = None):
    counts = status_counts(settings, batch_id)
    return counts if counts.get("done", 0) + counts.get("failed", 0) == total else None


def rows(settings, model):
    with session_factory(settings.database_url)() as session:
        return list(session.scalars(select(model)))


__all__ = [
    "Prediction",
    "Program",
    "Referral",
    "Study",
    "ham_inputs",
    "program_id",
    "status_counts",
    "all_done",
    "rows",
]
