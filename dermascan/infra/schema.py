"""The database schema (SQLAlchemy 2, typed ORM). Alembic migrations in ``migrations/`` are the
only way it changes; ``tests/test_project.py`` checks that the models and the migrations agree."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    true,
)
from sqlalchemy import false as sa_false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def iso_utc(value: dt.datetime | None) -> str | None:
    """ISO 8601 with an explicit UTC offset. SQLite hands back naive datetimes: DermaScan only
    ever stores UTC, so a naive one is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat()


def new_uuid() -> str:
    return str(uuid.uuid4())


intpk = Annotated[int, mapped_column(primary_key=True)]
timestamp = Annotated[dt.datetime, mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())]
optional_timestamp = Annotated[dt.datetime | None, mapped_column(DateTime(timezone=True))]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, str: String(255)}


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # VARCHAR + CHECK on both PostgreSQL and SQLite (no PostgreSQL TYPE to migrate)
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda e: [m.value for m in e],
    )


class Role(enum.StrEnum):
    UPLOADER = "uploader"
    SPECIALIST = "specialist"
    ADMIN = "admin"


class StudyStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class Priority(enum.StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


class ReferralStatus(enum.StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    DECIDED = "decided"


class Decision(enum.StrEnum):
    URGENT = "urgent_in_person_review"
    BIOPSY = "biopsy_or_excision"
    FOLLOW_UP = "routine_follow_up"
    BENIGN = "benign_no_action"
    POOR_QUALITY = "image_quality_insufficient"


DECISION_LABELS = {
    Decision.URGENT: "Urgent in-person review",
    Decision.BIOPSY: "Biopsy or excision",
    Decision.FOLLOW_UP: "Routine follow-up",
    Decision.BENIGN: "Benign, no action",
    Decision.POOR_QUALITY: "Image quality insufficient",
}


class OutcomeKind(enum.StrEnum):
    """What histopathology (or the decision not to biopsy) found: the truth the model is judged on."""

    MALIGNANT = "malignant"
    BENIGN = "benign"
    NOT_BIOPSIED = "not_biopsied"


class Program(Base):
    """A hospital site or a teledermatology program; tokens, batches and studies belong to one."""

    __tablename__ = "programs"
    id: Mapped[intpk]
    name: Mapped[str] = mapped_column(String(120), unique=True)
    # the share of malignant lesions the program expects among its studies: the displayed
    # probability is re-weighed to it (the referral decision is not)
    expected_prevalence: Mapped[float | None] = mapped_column(Float)
    # which generation of its callback signing secret is current (0: none issued; dermascan.security.keys)
    callback_secret_generation: Mapped[int] = mapped_column(default=0, server_default="0")
    # results go back to the program's DICOM destinations for studies from the portal and the
    # REST API too (not only for those that arrived by DICOM), under UIDs DermaScan makes
    dicom_results_for_all: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    # refuse studies sent without age, sex or anatomic site (each such row gets its reason); off by
    # default: the model scores them on what it was given (docs/model.md, missing metadata)
    require_metadata: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    created_at: Mapped[timestamp]


class ProgramThreshold(Base):
    """A program's own referral threshold for one bundle, set by an admin from the program's local
    validation (``dermascan.governance.local_validation``); the bundle's threshold is the default
    for every program without one. Studies scored from then on are referred by it."""

    __tablename__ = "program_thresholds"
    __table_args__ = (UniqueConstraint("program_id", "bundle_version"),)
    id: Mapped[intpk]
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id", ondelete="CASCADE"))
    bundle_version: Mapped[str] = mapped_column(String(80), ForeignKey("model_bundles.version"))
    threshold: Mapped[float] = mapped_column(Float)
    # what the local validation showed at it when it was set: sensitivity, specificity, their
    # intervals, the number of labelled studies
    basis: Mapped[dict[str, Any] | None]
    set_at: Mapped[timestamp]
    set_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))


class User(Base):
    __tablename__ = "users"
    id: Mapped[intpk]
    username: Mapped[str] = mapped_column(String(80), unique=True)
    password_hash: Mapped[str]
    role: Mapped[Role] = mapped_column(_enum(Role, "role"))
    program_id: Mapped[int | None] = mapped_column(ForeignKey("programs.id"))
    active: Mapped[bool] = mapped_column(default=True)
    # part of every session cookie: logout, a password change, a new role or disabling the user
    # bump it, and every cookie issued before stops working
    session_version: Mapped[int] = mapped_column(default=0, server_default="0")
    # a specialist sees referred cases of every program, but whole batches only of their own
    # program unless an admin grants this (docs/security.md)
    all_programs: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    created_at: Mapped[timestamp]
    last_login_at: Mapped[optional_timestamp]

    program: Mapped[Program | None] = relationship()


class ApiToken(Base):
    """A bearer token for the REST API. Only its sha256 is stored; ``prefix`` identifies it in lists."""

    __tablename__ = "api_tokens"
    id: Mapped[intpk]
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    name: Mapped[str] = mapped_column(String(120))
    prefix: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[timestamp]
    last_used_at: Mapped[optional_timestamp]
    revoked_at: Mapped[optional_timestamp]

    program: Mapped[Program] = relationship()


class ModelBundle(Base):
    """A deployed model bundle. ``threshold`` starts as the bundle's own and admins may move it."""

    __tablename__ = "model_bundles"
    version: Mapped[str] = mapped_column(String(80), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    manifest: Mapped[dict[str, Any]]
    threshold: Mapped[float] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(default=False)
    # scores every study the active bundle scores, in the same worker batch, and decides nothing
    shadow: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    retired_at: Mapped[optional_timestamp]
    registered_at: Mapped[timestamp]
    threshold_changed_at: Mapped[optional_timestamp]
    threshold_changed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))

    @property
    def state(self) -> str:
        if self.active:
            return "active"
        if self.shadow:
            return "shadow"
        return "retired" if self.retired_at is not None else "registered"


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("program_id", "idempotency_key", name="uq_batches_program_idempotency"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    source: Mapped[str] = mapped_column(String(16))  # portal | api | dicom | cli | demo
    label: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_status: Mapped[str | None] = mapped_column(String(40))
    submitted_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    total: Mapped[int] = mapped_column(default=0)
    rejected: Mapped[int] = mapped_column(default=0)
    report: Mapped[dict[str, Any] | None]  # per-record validation report, kept for idempotent replies
    created_at: Mapped[timestamp]
    completed_at: Mapped[optional_timestamp]

    program: Mapped[Program] = relationship()
    studies: Mapped[list[Study]] = relationship(back_populates="batch")


class Lesion(Base):
    """One lesion followed across visits: named by the sender (``lesion_id``; DICOM's Lesion
    Number), kept only as a keyed pseudonym, scoped to the program and to one patient."""

    __tablename__ = "lesions"
    __table_args__ = (UniqueConstraint("program_id", "key_pseudonym", name="uq_lesions_program_key"),)
    id: Mapped[intpk]
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    key_pseudonym: Mapped[str] = mapped_column(String(64))
    # the patient it belongs to (the first study that named one); another patient is refused
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[timestamp]

    studies: Mapped[list[Study]] = relationship(back_populates="lesion")


class Study(Base):
    """One lesion image with its patient metadata, as accepted; scored asynchronously."""

    __tablename__ = "studies"
    __table_args__ = (
        UniqueConstraint("program_id", "idempotency_key", name="uq_studies_program_idempotency"),
        Index("ix_studies_status_enqueued", "status", "enqueued_at"),
        Index("ix_studies_batch_status", "batch_id", "status"),
        Index("ix_studies_status_lease", "status", "lease_until"),
    )
    id: Mapped[intpk]
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id"))
    source: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64), index=True)
    # DICOM AccessionNumber, keyed like the patient pseudonym (never stored in clear)
    accession_pseudonym: Mapped[str | None] = mapped_column(String(64))
    # the DICOM header as received (no pixel data), encrypted in the blob store (keys.header_cipher)
    dicom_header_sha256: Mapped[str | None] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_format: Mapped[str] = mapped_column(String(16))
    image_width: Mapped[int | None]
    image_height: Mapped[int | None]
    priority: Mapped[Priority] = mapped_column(_enum(Priority, "priority"), default=Priority.BULK)
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus, "study_status"), default=StudyStatus.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[timestamp]
    enqueued_at: Mapped[optional_timestamp]
    started_at: Mapped[optional_timestamp]
    # the worker process scoring it and until when (renewed by its heartbeat; cleared when stored)
    lease_owner: Mapped[str | None] = mapped_column(String(120))
    lease_until: Mapped[optional_timestamp]
    # a score the edge scorer made offline, uploaded with the study (kept beside the server's)
    edge_result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # lesion follow-up: the lesion this study images, and when it was imaged (the visit's date,
    # as sent; None: when it was received) — a lesion's visits are ordered by it
    lesion_id: Mapped[int | None] = mapped_column(ForeignKey("lesions.id"), index=True)
    # the sender's own name of the lesion ("L-17"; "#3", a patient's lesion number), as results
    # give it back (the lesion's key is a pseudonym; the name is like external_id)
    lesion_ref: Mapped[str | None] = mapped_column(String(200))
    acquired_at: Mapped[optional_timestamp]
    finished_at: Mapped[optional_timestamp]
    # the image and heat map were deleted under the retention policy (results and decisions stay)
    image_purged_at: Mapped[optional_timestamp]

    batch: Mapped[Batch | None] = relationship(back_populates="studies")
    predictions: Mapped[list[Prediction]] = relationship(
        back_populates="study", order_by="Prediction.created_at", foreign_keys="Prediction.study_id"
    )
    referral: Mapped[Referral | None] = relationship(back_populates="study")
    lesion: Mapped[Lesion | None] = relationship(back_populates="studies")

    @property
    def visit_time(self) -> dt.datetime:
        return self.acquired_at or self.created_at


class Prediction(Base):
    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("study_id", "bundle_version", name="uq_predictions_study_bundle"),
        CheckConstraint("probability >= 0 AND probability <= 1", name="probability_range"),
    )
    id: Mapped[intpk]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    bundle_version: Mapped[str] = mapped_column(ForeignKey("model_bundles.version"))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    spread: Mapped[float | None] = mapped_column(Float)
    # the not-assessable gate: False with a reason when the image could not be assessed (then
    # the probability is kept for the record but decides nothing)
    assessable: Mapped[bool] = mapped_column(default=True, server_default=true())
    not_assessable_reason: Mapped[str | None] = mapped_column(String(120))
    feature_distance: Mapped[float | None] = mapped_column(Float)
    heatmap_sha256: Mapped[str | None] = mapped_column(String(64))
    # made by a shadow bundle: stored for comparison, never a referral, a result or a delivery
    shadow: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    # brightness, contrast, sharpness, min_side of the model's input (monitoring's image drift)
    image_stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # lesion follow-up (model.inference.change): this image's embedding, and the comparison with the same
    # lesion's previous visit when there was one (the study compared with, the change measure and
    # its share of unchanged same-lesion pairs below it, the change in probability, the verdicts)
    embedding: Mapped[list[float] | None] = mapped_column(JSON)
    # the metadata fields (age_approx, sex, anatom_site_general) the score was made without: for
    # them it rests on the image (model.inference.missing); empty when every field was given
    missing_fields: Mapped[list[str] | None] = mapped_column(JSON)
    # the differential: a probability per class of model.inference.diagnosis.CODES (mel, nv, bcc,
    # akiec, bkl, df, vasc), None for a bundle without it
    differential: Mapped[list[float] | None] = mapped_column(JSON)
    previous_study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id", ondelete="SET NULL"))
    change_measure: Mapped[float | None] = mapped_column(Float)
    change_percentile: Mapped[float | None] = mapped_column(Float)
    probability_change: Mapped[float | None] = mapped_column(Float)
    changed: Mapped[bool | None]
    newly_high_risk: Mapped[bool | None]
    created_at: Mapped[timestamp]

    study: Mapped[Study] = relationship(back_populates="predictions", foreign_keys=[study_id])


class Referral(Base):
    __tablename__ = "referrals"
    __table_args__ = (Index("ix_referrals_queue", "status", "tier", "created_at"),)
    id: Mapped[intpk]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    prediction_id: Mapped[int] = mapped_column(ForeignKey("predictions.id"))
    probability: Mapped[float] = mapped_column(Float)
    # newly_high_risk | high_risk (probability at or above the threshold) | changed (since the last
    # visit, below the threshold) | not_assessable (a person checks the image): referral_policy
    category: Mapped[str] = mapped_column(String(20), default="high_risk", server_default="high_risk")
    tier: Mapped[int] = mapped_column(Integer)  # 1 = highest priority
    status: Mapped[ReferralStatus] = mapped_column(
        _enum(ReferralStatus, "referral_status"), default=ReferralStatus.OPEN
    )
    claimed_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    claimed_at: Mapped[optional_timestamp]
    decision: Mapped[Decision | None] = mapped_column(_enum(Decision, "decision"))
    note: Mapped[str | None] = mapped_column(Text)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[optional_timestamp]
    # the specialist's own diagnosis, in the differential's coded list (or "other")
    specialist_diagnosis: Mapped[str | None] = mapped_column(String(16))
    # the model's most likely diagnosis when referred (within a tier, suspected melanoma comes first)
    suspected: Mapped[str | None] = mapped_column(String(8))
    # handed to a colleague: assigned, or asked for a second opinion (dermascan.referrals.queue.assign)
    assigned_to_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    assigned_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    assigned_at: Mapped[optional_timestamp]
    assignment_kind: Mapped[str | None] = mapped_column(String(16))  # assign | second_opinion
    assignment_note: Mapped[str | None] = mapped_column(Text)
    # the decision's callback to the sender (its batch's callback URL): sent / retry / gave_up (attempt n)
    callback_status: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[timestamp]

    study: Mapped[Study] = relationship(back_populates="referral")
    prediction: Mapped[Prediction] = relationship()
    claimed_by: Mapped[User | None] = relationship(foreign_keys=[claimed_by_id])
    decided_by: Mapped[User | None] = relationship(foreign_keys=[decided_by_id])
    assigned_to: Mapped[User | None] = relationship(foreign_keys=[assigned_to_id])
    assigned_by: Mapped[User | None] = relationship(foreign_keys=[assigned_by_id])
    # the decision's earlier versions, oldest first (empty: never amended)
    amendments: Mapped[list[DecisionAmendment]] = relationship(order_by="DecisionAmendment.amended_at", viewonly=True)


class DecisionAmendment(Base):
    """A decision as it stood before an amendment replaced it, with who amended it, when and why
    (the referral holds the decision in force; these are its earlier versions, oldest first)."""

    __tablename__ = "decision_amendments"
    id: Mapped[intpk]
    referral_id: Mapped[int] = mapped_column(ForeignKey("referrals.id", ondelete="CASCADE"), index=True)
    decision: Mapped[Decision] = mapped_column(_enum(Decision, "decision"))
    specialist_diagnosis: Mapped[str | None] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    decided_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(Text)
    amended_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    amended_at: Mapped[timestamp]

    decided_by: Mapped[User | None] = relationship(foreign_keys=[decided_by_id])
    amended_by: Mapped[User | None] = relationship(foreign_keys=[amended_by_id])


class AuditEvent(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[timestamp]
    action: Mapped[str] = mapped_column(String(60))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    object_type: Mapped[str | None] = mapped_column(String(40))
    object_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None]
    ip: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[User | None] = relationship()
    token: Mapped[ApiToken | None] = relationship()


class Outcome(Base):
    """A study's recorded outcome (one per study; a later record replaces it, both audited)."""

    __tablename__ = "outcomes"
    id: Mapped[intpk]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), unique=True)
    kind: Mapped[OutcomeKind] = mapped_column(_enum(OutcomeKind, "outcome_kind"))
    diagnosis: Mapped[str | None] = mapped_column(String(200))  # the type: melanoma, BCC, nevus…
    source: Mapped[str] = mapped_column(String(16))  # portal, api, csv
    recorded_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    token_id: Mapped[int | None] = mapped_column(ForeignKey("api_tokens.id"))
    recorded_at: Mapped[timestamp]


class DicomDestination(Base):
    """Where a program's results go back as DICOM (its PACS): a DIMSE C-STORE SCP or a STOW-RS
    URL. Set by an administrator (hospital-network addresses are expected here)."""

    __tablename__ = "dicom_destinations"
    __table_args__ = (UniqueConstraint("program_id", "name", name="uq_dicom_destinations_program_name"),)
    id: Mapped[intpk]
    program_id: Mapped[int] = mapped_column(ForeignKey("programs.id"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # dimse | stow
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    ae_title: Mapped[str | None] = mapped_column(String(16))
    tls: Mapped[bool] = mapped_column(default=False, server_default=sa_false())
    url: Mapped[str | None] = mapped_column(String(2000))
    username: Mapped[str | None] = mapped_column(String(255))
    # the STOW-RS password or bearer token, encrypted (keys.destination_cipher)
    secret_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    enabled: Mapped[bool] = mapped_column(default=True, server_default=true())
    created_at: Mapped[timestamp]

    program: Mapped[Program] = relationship()

    @property
    def target(self) -> str:
        if self.kind == "dimse":
            return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")
        return self.url or ""


class Delivery(Base):
    """One DICOM object of one study sent to one destination: its state, attempts and the last
    reason. The object's SOP Instance UID is the same on every attempt (a PACS stores it once)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("study_id", "destination_id", "object", name="uq_deliveries_study_destination_object"),
    )
    id: Mapped[intpk]
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    destination_id: Mapped[int] = mapped_column(ForeignKey("dicom_destinations.id", ondelete="CASCADE"))
    object: Mapped[str] = mapped_column(String(16))  # ai_sr | heatmap | verified_sr
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending | retrying | sent | failed
    attempts: Mapped[int] = mapped_column(default=0)
    detail: Mapped[str | None] = mapped_column(String(500))
    updated_at: Mapped[timestamp]

    destination: Mapped[DicomDestination] = relationship()
