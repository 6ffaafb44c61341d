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

from dermascan.errors import Invalid
from dermascan.infra.schema import Outcome, OutcomeKind, Study, utcnow
from dermascan.ingest import numbers
from dermascan.security import audit

CSV_COLUMNS = ("study_id", "outcome", "diagnosis")
MAX_DIAGNOSIS = 200
MAX_ROWS = 100_000


class OutcomeRowsInvalid(Invalid):
    """A CSV with bad rows: nothing was imported; ``errors`` lists every bad row."""

    def __init__(self, errors: list[dict], count: int | None = None):
        count = len(errors) if count is None else count
        super().__init__(f"{count} row(s) are not valid; nothing was imported")
        self.errors, self.count = errors, count


def parse_kind(value) -> OutcomeKind:
    text = str(value or "").strip().lower().replace(" ", "_").replace("-", "_")
    try:
        return OutcomeKind(text)
    except ValueError:
        shown = str(value)[:40] if isinstance(value, str) else type(value).__name__
        raise Invalid(f"outcome must be one of {', '.join(k.value for k in OutcomeKind)} (got {shown!r})") from None


def clean_diagnosis(kind: OutcomeKind, diagnosis) -> str | None:
    if diagnosis is not None and not isinstance(diagnosis, str):
        raise Invalid("diagnosis must be text")
    text = " ".join((diagnosis or "").split()) or None
    if text and len(text) > MAX_DIAGNOSIS:
        raise Invalid(f"diagnosis is longer than {MAX_DIAGNOSIS} characters")
    if kind == OutcomeKind.NOT_BIOPSIED and text:
        raise Invalid("a lesion that was not biopsied has no histopathological diagnosis")
    return text


def record(
    session: Session,
    study: Study | int,
    kind,
    diagnosis=None,
    *,
    source: str,
    user_id: int | None = None,
    token_id: int | None = None,
    ip: str | None = None,
) -> Outcome:
    """Record (or replace) the outcome of ``study`` (a Study or its id) in the caller's
    transaction; audited."""
    study_id = study if isinstance(study, int) else study.id
    kind = kind if isinstance(kind, OutcomeKind) else parse_kind(kind)
    diagnosis = clean_diagnosis(kind, diagnosis)
    row = session.scalar(select(Outcome).where(Outcome.study_id == study_id))
    previous = None if row is None else {"outcome": OutcomeKind(row.kind).value, "diagnosis": row.diagnosis}
    if row is None:
        row = Outcome(study_id=study_id)
        session.add(row)
    row.kind, row.diagnosis, row.source = kind, diagnosis, source
    row.recorded_by_id, row.token_id, row.recorded_at = user_id, token_id, utcnow()
    audit.record(
        session, "outcome_recorded", user_id=user_id, token_id=token_id, object_type="study", object_id=study_id,
        detail={"outcome": kind.value, "diagnosis": diagnosis, "source": source, "replaced": previous}, ip=ip,
    )  # fmt: skip
    session.flush()
    return row


@dataclass
class _Row:
    line: int
    study_id: int
    kind: OutcomeKind
    diagnosis: str | None


MAX_REPORTED = 1000  # bad rows listed in one answer (the count says how many there were)
CHUNK = 1000


def import_csv(
    session: Session, text, program_id: int | None, *, source: str = "csv", user_id=None, token_id=None, ip=None
) -> dict:
    """Import ``study_id,outcome,diagnosis`` rows (studies of ``program_id``; None: any program)
    from a string or a text stream, read row by row. All or nothing: any bad row raises
    OutcomeRowsInvalid listing the bad rows (the first MAX_REPORTED of them)."""
    stream = io.StringIO(text) if isinstance(text, str) else text
    try:
        return _import(session, stream, program_id, source=source, user_id=user_id, token_id=token_id, ip=ip)
    except csv.Error as exc:
        raise Invalid(f"the CSV cannot be read: {exc}") from None
    except UnicodeDecodeError:
        raise Invalid("the CSV is not UTF-8 text") from None


def _import(session: Session, stream, program_id: int | None, **who) -> dict:
    reader = csv.reader(stream)
    header = next(reader, None) or []
    columns = [c.strip().lstrip("\ufeff").lower() for c in header]
    missing = [c for c in ("study_id", "outcome") if c not in columns]
    if missing:
        raise Invalid(f"the CSV needs the columns {', '.join(CSV_COLUMNS)} (missing: {', '.join(missing)})")
    at = {name: columns.index(name) for name in CSV_COLUMNS if name in columns}
    good: list[_Row] = []
    errors: list[dict] = []
    bad = 0
    seen: dict[int, int] = {}

    def refuse(line, value, message):
        nonlocal bad
        bad += 1
        if len(errors) < MAX_REPORTED:
            errors.append({"line": line, "study_id": (value or "").strip()[:40] or None, "error": message})

    for line, cells in enumerate(reader, start=2):
        if line - 1 > MAX_ROWS:
            raise Invalid(f"at most {MAX_ROWS:,} rows per import")
        if not any(c.strip() for c in cells):
            continue
        raw = {name: (cells[i] if i < len(cells) else "") for name, i in at.items()}
        try:
            good.append(_row(line, raw, seen))
        except Invalid as exc:
            refuse(line, raw.get("study_id"), str(exc))
    good, unknown = _existing(session, good, program_id)
    for row in unknown:
        refuse(row.line, str(row.study_id), f"no study {row.study_id}")
    if bad:
        errors.sort(key=lambda e: e["line"])
        raise OutcomeRowsInvalid(errors, bad)
    if not good:
        raise Invalid("the CSV has no rows")
    for start in range(0, len(good), CHUNK):
        made = []
        for row in good[start : start + CHUNK]:
            made.append(record(session, row.study_id, row.kind, row.diagnosis, **who))
        for obj in made:  # flushed: a 100,000-row import does not keep 100,000 objects alive
            session.expunge(obj)
    return {"imported": len(good)}


def _row(line: int, raw: dict, seen: dict[int, int]) -> _Row:
    value = (raw.get("study_id") or "").strip()
    try:
        study_id = numbers.parse_int(value, "study_id", 1, 2**31 - 1)
    except numbers.NumberError:
        raise Invalid(f"study_id must be a whole number of at most 10 digits (got {value[:40]!r})") from None
    if study_id in seen:
        raise Invalid(f"study {study_id} is already on line {seen[study_id]}")
    seen[study_id] = line
    kind = parse_kind(raw.get("outcome"))
    return _Row(line, study_id, kind, clean_diagnosis(kind, raw.get("diagnosis")))


def _existing(session: Session, rows: list[_Row], program_id: int | None) -> tuple[list[_Row], list[_Row]]:
    """The rows whose study exists (in the program), and the others; ids looked up in chunks."""
    found: set[int] = set()
    ids = [r.study_id for r in rows]
    for start in range(0, len(ids), CHUNK):
        query = select(Study.id).where(Study.id.in_(ids[start : start + CHUNK]))
        if program_id is not None:
            query = query.where(Study.program_id == program_id)
        found.update(session.scalars(query))
    return [r for r in rows if r.study_id in found], [r for r in rows if r.study_id not in found]
