"""Outcomes: what histopathology found (malignant or benign, with its type) or that the lesion was
not biopsied — the truth a deployed model is judged on (a specialist's decision is one signal;
pathology is the truth). One outcome per study; recording another replaces it. Recorded on the
case page, by the REST API, or imported from a CSV (every bad row reported, nothing imported
unless all rows are good); each is audited with what it replaced."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.errors import Invalid, NotFound
from dermascan.infra.schema import Outcome, OutcomeKind, Study, utcnow
from dermascan.security import audit

CSV_COLUMNS = ("study_id", "outcome", "diagnosis")
MAX_DIAGNOSIS = 200
MAX_ROWS = 100_000


class OutcomeRowsInvalid(Invalid):
    """A CSV with bad rows: nothing was imported; ``errors`` lists every bad row."""

    def __init__(self, errors: list[dict]):
        super().__init__(f"{len(errors)} row(s) are not valid; nothing was imported")
        self.errors = errors


def parse_kind(value) -> OutcomeKind:
    text = str(value or "").strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return OutcomeKind(text)
    except ValueError:
        raise Invalid(f"outcome must be one of {', '.join(k.value for k in OutcomeKind)} (got {value!r})") from None


def clean_diagnosis(kind: OutcomeKind, diagnosis) -> str | None:
    text = " ".join(str(diagnosis or "").split()) or None
    if text and len(text) > MAX_DIAGNOSIS:
        raise Invalid(f"diagnosis is longer than {MAX_DIAGNOSIS} characters")
    if kind == OutcomeKind.NOT_BIOPSIED and text:
        raise Invalid("a lesion that was not biopsied has no histopathological diagnosis")
    return text


def record(
    session: Session,
    study: Study,
    kind,
    diagnosis=None,
    *,
    source: str,
    user_id: int | None = None,
    token_id: int | None = None,
    ip: str | None = None,
) -> Outcome:
    """Record (or replace) the outcome of ``study`` in the caller's transaction; audited."""
    kind = kind if isinstance(kind, OutcomeKind) else parse_kind(kind)
    diagnosis = clean_diagnosis(kind, diagnosis)
    row = session.scalar(select(Outcome).where(Outcome.study_id == study.id))
    previous = None if row is None else {"outcome": OutcomeKind(row.kind).value, "diagnosis": row.diagnosis}
    if row is None:
        row = Outcome(study_id=study.id)
        session.add(row)
    row.kind, row.diagnosis, row.source = kind, diagnosis, source
    row.recorded_by_id, row.token_id, row.recorded_at = user_id, token_id, utcnow()
    audit.record(
        session, "outcome_recorded", user_id=user_id, token_id=token_id, object_type="study", object_id=study.id,
        detail={"outcome": kind.value, "diagnosis": diagnosis, "source": source, "replaced": previous}, ip=ip,
    )  # fmt: skip
    session.flush()
    return row


@dataclass
class _Row:
    line: int
    study: Study
    kind: OutcomeKind
    diagnosis: str | None


def import_csv(
    session: Session, text: str, program_id: int | None, *, source: str = "csv", user_id=None, token_id=None, ip=None
) -> dict:
    """Import ``study_id,outcome,diagnosis`` rows (studies of ``program_id``; None: any program).
    All or nothing: any bad row raises OutcomeRowsInvalid listing every bad row."""
    try:
        return _import(session, text, program_id, source=source, user_id=user_id, token_id=token_id, ip=ip)
    except csv.Error as exc:
        raise Invalid(f"the CSV cannot be read: {exc}") from None


def _import(session: Session, text: str, program_id: int | None, **who) -> dict:
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
    missing = [c for c in ("study_id", "outcome") if c not in (reader.fieldnames or [])]
    if missing:
        raise Invalid(f"the CSV needs the columns {', '.join(CSV_COLUMNS)} (missing: {', '.join(missing)})")
    good: list[_Row] = []
    errors: list[dict] = []
    seen: dict[int, int] = {}
    for line, raw in enumerate(reader, start=2):
        if line - 1 > MAX_ROWS:
            raise Invalid(f"at most {MAX_ROWS:,} rows per import")
        try:
            good.append(_row(session, line, raw, program_id, seen))
        except (Invalid, NotFound) as exc:
            errors.append({"line": line, "study_id": (raw.get("study_id") or "").strip() or None, "error": str(exc)})
    if errors:
        raise OutcomeRowsInvalid(errors)
    if not good:
        raise Invalid("the CSV has no rows")
    for row in good:
        record(session, row.study, row.kind, row.diagnosis, **who)
    return {"imported": len(good)}


def _row(session: Session, line: int, raw: dict, program_id: int | None, seen: dict[int, int]) -> _Row:
    value = (raw.get("study_id") or "").strip()
    if not value.isdigit():
        raise Invalid(f"study_id must be a whole number (got {value!r})")
    study = session.get(Study, int(value))
    if study is None or (program_id is not None and study.program_id != program_id):
        raise NotFound(f"no study {value}")
    if study.id in seen:
        raise Invalid(f"study {value} is already on line {seen[study.id]}")
    seen[study.id] = line
    kind = parse_kind(raw.get("outcome"))
    return _Row(line, study, kind, clean_diagnosis(kind, raw.get("diagnosis")))
