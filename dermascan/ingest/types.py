"""What every ingest path produces: one :class:`StudyInput` per study it could read (and
:class:`~dermascan.ingest.errors.Rejection` for what it could not). Submission takes it from here."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    dicom_header: bytes | None = None  # the DICOM header as received (no pixels), kept encrypted
    row: int | None = None  # where it came from, for the validation report
    edge_result: dict | None = None  # a score made offline by the edge scorer (ingest.edge_results)
    # lesion follow-up (ingest.follow_up), as sent: checked at submission
    lesion_id: object = None
    acquired_at: object = None
    acquired_at_field: str = "acquired_at"
