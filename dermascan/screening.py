"""The screening service: submit studies → one transaction stores blobs and rows → after the
commit, enqueue their ids. Used alike by the portal, the REST API, STOW-RS, the C-STORE
receiver and the CLI.

Persist first, then enqueue: if the broker is down, or the process dies after the commit, the
sweeper (``sweep``) sends the studies later. Nothing accepted is lost.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import and_, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dermascan import keys, queue, referrals
from dermascan.blobs import BlobStore
from dermascan.config import Settings
from dermascan.db import session_factory
from dermascan.ingest.errors import Rejection
from dermascan.ingest.images import ImageRejected, inspect_image
from dermascan.ingest.records import FieldError, clean_metadata
from dermascan.schema import Batch, Priority, Program, Study, StudyStatus, utcnow

log = logging.getLogger(__name__)


@dataclass
class StudyInput:
    """One study as parsed by an ingest path, before validation."""

    image: bytes
    metadata: dict = field(default_factory=dict)
    external_id: str | None = None
    patient_id: str | None = None
    idempotency_key: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None  # an identifier: stored only as a pseudonym
    row: int | None = None  # where it came from, for the validation report


@dataclass
class Accepted:
    row: int | None
    study_id: int
    external_id: str | None
    duplicate: bool = False  # same idempotency key seen before: the earlier study is returned

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class SubmitResult:
    batch_id: str | None
    accepted: list[Accepted] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    new_study_ids: list[int] = field(default_factory=list)
    interactive: bool = False
    replayed: bool = False  # the whole batch was a retry of an earlier one

    def report(self) -> dict:
        return {
            "batch_id": self.batch_id,
            "accepted": len(self.accepted),
            "rejected": len(self.rejected),
            "duplicates": sum(a.duplicate for a in self.accepted),
            "records": sorted(
                [dict(a.to_dict(), status="accepted") for a in self.accepted]
                + [dict(r.to_dict(), status="rejected") for r in self.rejected],
                key=lambda record: record.get("row") or 0,
            ),
        }


def pseudonymise(secret_key: str, program_id: int, patient_id: str | None) -> str | None:
    """A stable, non-reversible patient pseudonym: HMAC-SHA256 under the pseudonym key that
    ``dermascan.keys`` derives from the installation secret (not the session key: rotating that
    keeps every pseudonym)."""
    if not patient_id or not str(patient_id).strip():
        return None
    message = f"{program_id}:{str(patient_id).strip()}".encode()
    return hmac.new(keys.pseudonym_key(secret_key), message, hashlib.sha256).hexdigest()[:32]


def get_or_create_program(session: Session, name: str) -> Program:
    program = session.scalar(select(Program).where(Program.name == name))
    if program is None:
        program = Program(name=name)
        session.add(program)
        session.flush()
    return program


class SubmitStudies:
    """Validate and store studies in the caller's transaction (no commit, no enqueue)."""

    def __init__(
        self,
        settings: Settings,
        program_id: int,
        inputs: Sequence[StudyInput],
        *,
        source: str,
        interactive: bool = False,
        batch: bool = True,
        label: str | None = None,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        user_id: int | None = None,
        token_id: int | None = None,
        prior_rejections: Sequence[Rejection] = (),
        progress: Callable[[int], None] | None = None,
        batch_id: str | None = None,
    ):
        self.settings = settings
        self.program_id = program_id
        self.inputs = inputs
        self.source = source
        self.interactive = interactive
        self.make_batch = batch
        self.label = label
        self.idempotency_key = idempotency_key
        self.callback_url = callback_url
        self.user_id = user_id
        self.token_id = token_id
        self.prior_rejections = list(prior_rejections)
        self.progress = progress
        self.batch_id = batch_id  # add to this existing batch (one per DICOM association)
        self.blobs = BlobStore(settings.blob_dir)

    def run(self, session: Session) -> SubmitResult:
        if self.make_batch and self.idempotency_key:
            earlier = session.scalar(
                select(Batch).where(Batch.program_id == self.program_id, Batch.idempotency_key == self.idempotency_key)
            )
            if earlier is not None:
                return replay(earlier)
        batch = None
        if self.make_batch and not self.batch_id:
            batch = Batch(
                program_id=self.program_id,
                source=self.source,
                label=self.label,
                idempotency_key=self.idempotency_key,
                callback_url=self.callback_url,
                submitted_by_id=self.user_id,
                token_id=self.token_id,
            )
            session.add(batch)
            session.flush()
        batch_id = batch.id if batch is not None else self.batch_id
        result = SubmitResult(batch_id, rejected=list(self.prior_rejections), interactive=self.interactive)
        priority = Priority.INTERACTIVE if self.interactive else Priority.BULK
        # 1. validate everything in Python (images at the door, metadata), store the blobs
        rows: list[dict] = []
        order: list[tuple] = []  # ("new", row index) | ("same-key", key), per accepted input
        first_row_of_key: dict[str, int] = {}
        for item in self.inputs:
            key = item.idempotency_key or (item.sop_instance_uid and f"sop:{item.sop_instance_uid}")
            if key and key in first_row_of_key:
                order.append(("same-key", key, item))
                self._tick()
                continue
            try:
                info = inspect_image(item.image, self.settings.max_image_bytes, self.settings.max_image_pixels)
                meta = clean_metadata(item.metadata)
            except ImageRejected as exc:
                result.rejected.append(Rejection(item.row, str(exc), item.external_id, "image"))
                self._tick()
                continue
            except FieldError as exc:
                result.rejected.append(Rejection(item.row, str(exc), item.external_id, exc.field))
                self._tick()
                continue
            if key:
                first_row_of_key[key] = len(rows)
            order.append(("new", len(rows), item))
            rows.append(
                {
                    "program_id": self.program_id,
                    "batch_id": batch_id,
                    "source": self.source,
                    "external_id": item.external_id,
                    "idempotency_key": key,
                    "study_instance_uid": item.study_instance_uid,
                    "series_instance_uid": item.series_instance_uid,
                    "sop_instance_uid": item.sop_instance_uid,
                    "patient_pseudonym": pseudonymise(self.settings.secret_key, self.program_id, item.patient_id),
                    "accession_pseudonym": pseudonymise(
                        self.settings.secret_key,
                        self.program_id,
                        item.accession_number and f"accession:{item.accession_number}",
                    ),
                    "metadata": meta,
                    "image_sha256": self.blobs.put(item.image, durable=False),
                    "image_format": info.format,
                    "image_width": info.width,
                    "image_height": info.height,
                    "priority": priority,
                    "status": StudyStatus.QUEUED,
                    "attempts": 0,
                    "created_at": utcnow(),
                }
            )
            self._tick()
        # 2. flush the blobs to disk (concurrently) while the rows go in with multi-row inserts; a
        #    key already known (a retry, a re-sent SOP instance) inserts nothing
        synced = _blob_flusher().submit(self.blobs.sync, [r["image_sha256"] for r in rows])
        ids, existing = insert_studies(session, self.program_id, rows)
        synced.result()  # stored means on disk: only then may the caller commit and answer
        for kind, ref, item in order:
            if kind == "new" and ids[ref] is not None:
                result.accepted.append(Accepted(item.row, ids[ref], item.external_id))
                result.new_study_ids.append(ids[ref])
            else:
                key = rows[ref]["idempotency_key"] if kind == "new" else ref
                study_id = ids[first_row_of_key[key]] or existing[key]
                result.accepted.append(Accepted(item.row, study_id, item.external_id, duplicate=True))
        if batch is not None and not self.batch_id:
            batch.total = len(result.accepted)
            batch.rejected = len(result.rejected)
            batch.report = result.report()
        return result

    def _tick(self):
        if self.progress:
            self.progress(1)


_flusher: tuple[int, ThreadPoolExecutor] | None = None


def _blob_flusher() -> ThreadPoolExecutor:
    """The process's threads that flush blobs while the rows go in: made once (per process, so a
    forked child never inherits a pool without threads), not once per submission — a thread start
    cost a C-STORE of one instance more than the fsync it overlapped."""
    global _flusher
    if _flusher is None or _flusher[0] != os.getpid():
        _flusher = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="blob-flush"))
    return _flusher[1]


def _insert(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(Study.__table__)
    if dialect == "sqlite":
        return sqlite.insert(Study.__table__)
    raise NotImplementedError(f"no ON CONFLICT support for {dialect}")


def insert_studies(session: Session, program_id: int, rows: list[dict], chunk: int = 500):
    """Insert study rows → (id per row, or None where its idempotency key already existed;
    {key: id} of those earlier studies). Two statements per chunk at most, whatever its size."""
    ids: list[int | None] = [None] * len(rows)
    keyed = [i for i, r in enumerate(rows) if r["idempotency_key"]]
    plain = [i for i, r in enumerate(rows) if not r["idempotency_key"]]
    for start in range(0, len(plain), chunk):
        part = plain[start : start + chunk]
        returned = session.execute(
            _insert(session).returning(Study.__table__.c.id, sort_by_parameter_order=True), [rows[i] for i in part]
        ).scalars()
        for i, study_id in zip(part, returned, strict=True):
            ids[i] = study_id
    existing: dict[str, int] = {}
    for start in range(0, len(keyed), chunk):
        part = keyed[start : start + chunk]
        stmt = _insert(session).on_conflict_do_nothing(index_elements=["program_id", "idempotency_key"])
        stmt = stmt.returning(Study.__table__.c.id, Study.__table__.c.idempotency_key)
        inserted = dict((key, study_id) for study_id, key in session.execute(stmt, [rows[i] for i in part]))
        for i in part:
            ids[i] = inserted.get(rows[i]["idempotency_key"])
        missing = [rows[i]["idempotency_key"] for i in part if ids[i] is None]
        if missing:
            existing.update(
                (key, study_id)
                for study_id, key in session.execute(
                    select(Study.id, Study.idempotency_key).where(
                        Study.program_id == program_id, Study.idempotency_key.in_(missing)
                    )
                )
            )
    return ids, existing


def replay(batch: Batch) -> SubmitResult:
    """The answer to a retried upload (same Idempotency-Key): the first upload's report, no new rows."""
    report = batch.report or {}
    result = SubmitResult(batch.id, replayed=True)
    for record in report.get("records", []):
        if record.get("status") == "accepted":
            result.accepted.append(
                Accepted(
                    record.get("row"), record["study_id"], record.get("external_id"), record.get("duplicate", False)
                )
            )
        else:
            result.rejected.append(
                Rejection(record.get("row"), record["reason"], record.get("external_id"), record.get("field"))
            )
    return result


def enqueue(settings: Settings, study_ids: Sequence[int], interactive: bool) -> list[int]:
    """After the commit: send the ids and stamp ``enqueued_at`` on those that were sent."""
    if not study_ids:
        return []
    sent = queue.send_scoring(settings, study_ids, interactive)
    if sent:
        factory = session_factory(settings.database_url)
        with factory() as session, session.begin():
            now = utcnow()
            for start in range(0, len(sent), 1000):
                session.execute(update(Study).where(Study.id.in_(sent[start : start + 1000])).values(enqueued_at=now))
    return sent


def submit(settings: Settings, program_id: int, inputs: Sequence[StudyInput], **options) -> SubmitResult:
    """Store (one transaction), then enqueue. The convenience used by every ingest path."""
    command = SubmitStudies(settings, program_id, inputs, **options)
    factory = session_factory(settings.database_url)
    try:
        with factory() as session, session.begin():
            result = command.run(session)
    except IntegrityError:
        # a concurrent request with the same idempotency key won the race: answer as a retry
        key = options.get("idempotency_key")
        if not key:
            raise
        with factory() as session:
            earlier = session.scalar(select(Batch).where(Batch.program_id == program_id, Batch.idempotency_key == key))
            if earlier is None:
                raise
            return replay(earlier)
    enqueue(settings, result.new_study_ids, command.interactive)
    return result


def sweep(settings: Settings, now: dt.datetime | None = None, unsent_after_s: float = 5.0) -> dict:
    """Re-send studies that fell through the cracks.

    - queued and never sent (the broker was down at submit time), after ``unsent_after_s``;
    - queued and sent longer ago than ``sweep_queued_after_s`` (a message lost with a broker);
    - processing for longer than ``sweep_processing_after_s`` (a worker died mid-batch).
    Each is stamped when re-sent, so a long backlog is not re-sent on every sweep.
    """
    now = now or utcnow()
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        rows = session.execute(
            select(Study.id, Study.priority, Study.status)
            .where(
                or_(
                    and_(
                        Study.status == StudyStatus.QUEUED,
                        Study.enqueued_at.is_(None),
                        Study.created_at < now - dt.timedelta(seconds=unsent_after_s),
                    ),
                    and_(
                        Study.status == StudyStatus.QUEUED,
                        Study.enqueued_at < now - dt.timedelta(seconds=settings.sweep_queued_after_s),
                    ),
                    and_(
                        Study.status == StudyStatus.PROCESSING,
                        Study.started_at < now - dt.timedelta(seconds=settings.sweep_processing_after_s),
                    ),
                )
            )
            .order_by(Study.id)
            .with_for_update(skip_locked=True)
        ).all()
        stuck = [r.id for r in rows if r.status == StudyStatus.PROCESSING]
        if stuck:
            session.execute(update(Study).where(Study.id.in_(stuck)).values(status=StudyStatus.QUEUED, started_at=None))
        claims = referrals.expire_stale_claims(session, settings.claim_timeout_s)
    interactive = [r.id for r in rows if r.priority == Priority.INTERACTIVE]
    bulk = [r.id for r in rows if r.priority != Priority.INTERACTIVE]
    sent = enqueue(settings, interactive, True) + enqueue(settings, bulk, False)
    if rows or claims:
        log.info(
            "sweep: %d found (%d stuck processing), %d re-sent; %d stale claims released",
            len(rows),
            len(stuck),
            len(sent),
            claims,
        )
    purged = {}
    if settings.retention_days > 0:
        from dermascan import retention

        purged = retention.purge(factory, settings.blob_dir, settings.retention_days, now=now)
    return {
        "found": len(rows), "stuck_processing": len(stuck), "sent": len(sent), "stale_claims": claims,
        "purged": purged.get("studies", 0),
    }  # fmt: skip
