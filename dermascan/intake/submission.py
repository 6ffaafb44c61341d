"""Submission: parsed studies → one transaction stores blobs and rows → after the commit, their
ids are enqueued. Every way in (the portal, the REST API, STOW-RS, the C-STORE receiver, the CLI)
reads "parse (``dermascan.ingest``), then submit".

Persist first, then enqueue: if the broker is down, or the process dies after the commit, the
sweeper (``dermascan.upkeep.sweeper``) sends the studies later. Nothing accepted is lost.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dermascan.config import Settings
from dermascan.infra import broker
from dermascan.infra.blobs import blob_store
from dermascan.infra.db import dialect_insert, session_factory
from dermascan.infra.schema import Batch, Priority, Program, Study, StudyStatus, utcnow
from dermascan.ingest.errors import Rejection
from dermascan.ingest.images import ImageRejected, inspect_image
from dermascan.ingest.records import FieldError, clean_metadata
from dermascan.ingest.types import StudyInput
from dermascan.intake import lesions
from dermascan.security import audit, keys
from dermascan.security.identity import pseudonymise

log = logging.getLogger(__name__)
# what a program that requires metadata refuses a study without (off by default: the model scores
# a study on what it was given, docs/model.md)
REQUIRED_METADATA = ("age_approx", "sex", "anatom_site_general")
REQUIRED_TEXT = "age, sex and anatomic site"


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


class _Entry(NamedTuple):
    """One accepted input: its staged row (None when its key already came earlier in the same
    upload) and its idempotency key (explicit, or the SOP Instance UID)."""

    item: StudyInput
    row: int | None
    key: str | None


@dataclass
class _Staged:
    rows: list[dict] = field(default_factory=list)  # to insert, one per distinct new study
    entries: list[_Entry] = field(default_factory=list)  # per accepted input, in input order
    first_row_of_key: dict[str, int] = field(default_factory=dict)


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
        ip: str | None = None,
        join_daily: bool = False,
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
        self.ip = ip
        # join today's batch of this user with the same label (a person's single uploads of a day
        # are one batch), else open it
        self.join_daily = join_daily
        self.blobs = blob_store(settings)

    def run(self, session: Session) -> SubmitResult:
        if self.make_batch and self.idempotency_key:
            earlier = find_replay(session, self.program_id, self.idempotency_key)
            if earlier is not None:
                return earlier
        result = SubmitResult(self.batch_id, rejected=list(self.prior_rejections), interactive=self.interactive)
        staged = self._validate(session, result)
        if not staged.entries:  # nothing accepted: nothing is created (every row's reason is in result)
            return result
        batch = self._open_batch(session)
        batch_id = result.batch_id = batch.id if batch is not None else self.batch_id
        for row in staged.rows:
            row["batch_id"] = batch_id
        # flush the blobs to disk (concurrently) while the rows go in with multi-row inserts; a
        # key already known (a retry, a re-sent SOP instance) inserts nothing
        digests = [r["image_sha256"] for r in staged.rows] + [
            r["dicom_header_sha256"] for r in staged.rows if r["dicom_header_sha256"]
        ]
        synced = _blob_flusher().submit(self.blobs.sync, digests)
        ids, existing = insert_studies(session, self.program_id, staged.rows)
        synced.result()  # stored means on disk: only then may the caller commit and answer
        self._accept(staged, ids, existing, result)
        if batch is not None:
            joined = batch.total is not None and batch.total > 0
            batch.total = (
                session.scalar(select(func.count()).select_from(Study).where(Study.batch_id == batch.id))
                if joined
                else len(result.accepted)
            )
            batch.rejected = (batch.rejected or 0) + len(result.rejected) if joined else len(result.rejected)
            batch.report = result.report()  # the latest upload's report
            if joined and result.new_study_ids:
                batch.completed_at = None  # it has work again
            # the upload and its audit event commit together (or not at all)
            audit.record(
                session, "upload", user_id=self.user_id, token_id=self.token_id, object_type="batch",
                object_id=batch.id, ip=self.ip,
                detail={"source": self.source, "accepted": len(result.accepted), "rejected": len(result.rejected)},
            )  # fmt: skip
        return result

    def _open_batch(self, session: Session) -> Batch | None:
        """A new batch row, unless batching is off or the studies join an existing batch."""
        if not self.make_batch or self.batch_id:
            return None
        if self.join_daily and self.label:
            today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
            found = session.scalar(
                select(Batch)
                .where(
                    Batch.program_id == self.program_id, Batch.label == self.label, Batch.submitted_by_id == self.user_id,
                    Batch.source == self.source, Batch.created_at >= today,
                )
                .order_by(Batch.created_at.desc())
                .limit(1)
                .with_for_update()
            )  # fmt: skip
            if found is not None:
                return found
        return open_batch(
            session, self.program_id, self.source, self.label, idempotency_key=self.idempotency_key,
            callback_url=self.callback_url, user_id=self.user_id, token_id=self.token_id,
        )  # fmt: skip

    def _follow_up(self, session: Session, patients: list) -> tuple[dict[int, object], lesions.Lesions]:
        """Each input's checked follow-up fields (or its FieldError), and the upload's lesions."""
        secret = self.settings.secret_key
        named: dict[int, object] = {}
        first_patient: dict[str, str | None] = {}
        for i, item in enumerate(self.inputs):
            try:
                named[i] = lesions.check(secret, self.program_id, item)
            except FieldError as exc:
                named[i] = exc
                continue
            if named[i].key is not None and named[i].key not in first_patient:
                first_patient[named[i].key] = patients[i]
        return named, lesions.Lesions(session, self.program_id, first_patient)

    def _validate(self, session: Session, result: SubmitResult) -> _Staged:
        """Check every input in Python (the image at the door, the metadata, the lesion and the
        visit's date) and stage the rows and blobs of the good ones; rejections go to ``result``."""
        staged = _Staged()
        priority = Priority.INTERACTIVE if self.interactive else Priority.BULK
        # one patient pseudonym per input, used for its lesion and its row
        patients = [pseudonymise(self.settings.secret_key, self.program_id, item.patient_id) for item in self.inputs]
        named, known_lesions = self._follow_up(session, patients)
        program = session.get(Program, self.program_id)
        required = REQUIRED_METADATA if program is not None and program.require_metadata else ()
        for index, item in enumerate(self.inputs):
            self._tick()
            key = item.idempotency_key or (item.sop_instance_uid and f"sop:{item.sop_instance_uid}")
            if key and key in staged.first_row_of_key:
                staged.entries.append(_Entry(item, row=None, key=key))  # the same study twice in one upload
                continue
            try:
                _no_nul(item)
                info = inspect_image(item.image, self.settings.max_image_bytes, self.settings.max_image_pixels)
                meta = clean_metadata(item.metadata)
                for name in required:
                    if meta.get(name) is None:
                        raise FieldError(name, f"missing: this program requires {REQUIRED_TEXT} with every study")
                follow = named[index]
                if isinstance(follow, FieldError):
                    raise follow
                lesion_id = None if follow.key is None else known_lesions.claim(follow.key, patients[index])
            except ImageRejected as exc:
                result.rejected.append(Rejection(item.row, str(exc), item.external_id, "image"))
                continue
            except FieldError as exc:
                result.rejected.append(Rejection(item.row, str(exc), item.external_id, exc.field))
                continue
            if key:
                staged.first_row_of_key[key] = len(staged.rows)
            staged.entries.append(_Entry(item, row=len(staged.rows), key=key))
            row = self._row(item, key, meta, info, priority)
            row.update(lesion_id=lesion_id, lesion_ref=follow.name, acquired_at=follow.acquired_at,
                       patient_pseudonym=patients[index])  # fmt: skip
            staged.rows.append(row)
        return staged

    def _row(self, item: StudyInput, key: str | None, meta: dict, info, priority) -> dict:
        secret = self.settings.secret_key
        accession = item.accession_number and f"accession:{item.accession_number}"
        return {
            "program_id": self.program_id,
            "batch_id": None,  # the batch is opened once something is accepted
            "source": self.source,
            "external_id": item.external_id,
            "idempotency_key": key,
            "study_instance_uid": item.study_instance_uid,
            "series_instance_uid": item.series_instance_uid,
            "sop_instance_uid": item.sop_instance_uid,
            "accession_pseudonym": pseudonymise(secret, self.program_id, accession),
            "dicom_header_sha256": self.blobs.put(keys.header_cipher(secret).encrypt(item.dicom_header), durable=False)
            if item.dicom_header
            else None,
            "metadata": meta,
            "image_sha256": self.blobs.put(item.image, durable=False),
            "image_format": info.format,
            "image_width": info.width,
            "image_height": info.height,
            "priority": priority,
            "edge_result": item.edge_result,
            "status": StudyStatus.QUEUED,
            "attempts": 0,
            "created_at": utcnow(),
        }

    @staticmethod
    def _accept(staged: _Staged, ids: list[int | None], existing: dict[str, int], result: SubmitResult) -> None:
        """Every staged input → an accepted study: new, or (same key seen before) the earlier one."""
        for entry in staged.entries:
            study_id = ids[entry.row] if entry.row is not None else None
            if study_id is not None:
                result.accepted.append(Accepted(entry.item.row, study_id, entry.item.external_id))
                result.new_study_ids.append(study_id)
            else:
                study_id = ids[staged.first_row_of_key[entry.key]] or existing[entry.key]
                result.accepted.append(Accepted(entry.item.row, study_id, entry.item.external_id, duplicate=True))

    def _tick(self):
        if self.progress:
            self.progress(1)


def _no_nul(item: StudyInput) -> None:
    """A NUL character is in no identifier or metadata value (and the database refuses one)."""
    texts = [item.external_id, item.patient_id, item.idempotency_key, item.accession_number]
    texts += [k for k in item.metadata] + [v for v in item.metadata.values() if isinstance(v, str)]
    for text in texts:
        if isinstance(text, str) and "\x00" in text:
            raise FieldError("metadata", "a NUL character is not allowed in an identifier or a metadata value")


_flusher: tuple[int, ThreadPoolExecutor] | None = None


def _blob_flusher() -> ThreadPoolExecutor:
    """The process's threads that flush blobs while the rows go in: made once (per process, so a
    forked child never inherits a pool without threads), not once per submission — a thread start
    cost a C-STORE of one instance more than the fsync it overlapped."""
    global _flusher
    if _flusher is None or _flusher[0] != os.getpid():
        _flusher = (os.getpid(), ThreadPoolExecutor(8, thread_name_prefix="blob-flush"))
    return _flusher[1]


def insert_studies(session: Session, program_id: int, rows: list[dict], chunk: int = 500):
    """Insert study rows → (id per row, or None where its idempotency key already existed;
    {key: id} of those earlier studies). Two statements per chunk at most, whatever its size."""
    ids: list[int | None] = [None] * len(rows)
    keyed = [i for i, r in enumerate(rows) if r["idempotency_key"]]
    plain = [i for i, r in enumerate(rows) if not r["idempotency_key"]]
    for start in range(0, len(plain), chunk):
        part = plain[start : start + chunk]
        returned = session.execute(
            dialect_insert(session, Study.__table__).returning(Study.__table__.c.id, sort_by_parameter_order=True),
            [rows[i] for i in part],
        ).scalars()
        for i, study_id in zip(part, returned, strict=True):
            ids[i] = study_id
    existing: dict[str, int] = {}
    for start in range(0, len(keyed), chunk):
        part = keyed[start : start + chunk]
        stmt = dialect_insert(session, Study.__table__).on_conflict_do_nothing(
            index_elements=["program_id", "idempotency_key"]
        )
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


def open_batch(session: Session, program_id: int, source: str, label: str | None, **columns) -> Batch:
    """A new Batch row (flushed, so it has its id) in the caller's transaction."""
    batch = Batch(
        program_id=program_id, source=source, label=label, idempotency_key=columns.get("idempotency_key"),
        callback_url=columns.get("callback_url"), submitted_by_id=columns.get("user_id"),
        token_id=columns.get("token_id"),
    )  # fmt: skip
    session.add(batch)
    session.flush()
    return batch


def find_replay(session: Session, program_id: int, key: str) -> SubmitResult | None:
    """The answer to an upload whose Idempotency-Key this program used before (the first upload's
    report), or None. The one lookup of a replay, for every door that takes a key."""
    earlier = session.scalar(select(Batch).where(Batch.program_id == program_id, Batch.idempotency_key == key))
    return None if earlier is None else replay(earlier)


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
    sent = broker.send_scoring(settings, study_ids, interactive)
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
            earlier = find_replay(session, program_id, key)
        if earlier is None:
            raise
        return earlier
    enqueue(settings, result.new_study_ids, command.interactive)
    return result


class BatchStream:
    """A batch that fills over time — one DICOM association: the Batch row and its upload audit
    event are written with the first study, each study is stored as it arrives (its own
    transaction: a C-STORE is answered once the instance is safe), new studies are enqueued in
    chunks of ``bulk_chunk_size`` as they accrue, and :meth:`close` sets the total and enqueues the
    rest. The same submission path as every other door, one study at a time."""

    def __init__(self, settings: Settings, program_id: int, source: str, label: str, *, ip: str | None = None,
                 detail: dict | None = None):  # fmt: skip
        self.settings, self.program_id, self.source, self.label = settings, program_id, source, label
        self.ip, self.detail = ip, detail or {}
        # no liveness ping per instance (a round trip each); a dropped connection is retried once
        self.factory = session_factory(settings.database_url, pre_ping=False)
        self.batch_id: str | None = None
        self.pending: list[int] = []
        self.lock = threading.Lock()

    def _opened(self) -> str:
        with self.lock:
            if self.batch_id is not None:
                return self.batch_id
        with self.factory() as session, session.begin():
            batch = open_batch(session, self.program_id, self.source, self.label)
            audit.record(
                session, "upload", object_type="batch", object_id=batch.id, ip=self.ip,
                detail={"source": self.source, **self.detail},
            )  # fmt: skip
            batch_id = batch.id
        with self.lock:
            self.batch_id = self.batch_id or batch_id
            return self.batch_id

    def add(self, item: StudyInput) -> SubmitResult:
        """Store one study in the batch (opening it first); enqueue a full chunk."""
        command = SubmitStudies(self.settings, self.program_id, [item], source=self.source, batch_id=self._opened())
        with self.factory() as session, session.begin():
            result = command.run(session)
        chunk = None
        with self.lock:
            self.pending.extend(result.new_study_ids)
            if len(self.pending) >= self.settings.bulk_chunk_size:
                chunk, self.pending = self.pending, []
        if chunk:
            enqueue(self.settings, chunk, interactive=False)
        return result

    def close(self) -> None:
        """The batch's total (what was stored), and the studies not yet enqueued."""
        with self.lock:
            chunk, self.pending, batch_id = self.pending, [], self.batch_id
        if batch_id is not None:
            with self.factory() as session, session.begin():
                count = select(func.count()).select_from(Study).where(Study.batch_id == batch_id).scalar_subquery()
                session.execute(update(Batch).where(Batch.id == batch_id).values(total=count))
        if chunk:
            enqueue(self.settings, chunk, interactive=False)
