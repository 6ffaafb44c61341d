"""Which lesion each incoming study images (lesion follow-up, at intake).

A study naming a lesion (``ingest.follow_up``) is linked to the program's lesion of that name —
made on its first visit — kept only as a keyed pseudonym. A lesion belongs to one patient: a
study naming a lesion already known for another patient is refused (its row only; the rest of
the batch goes in), and so is a second patient naming the same new lesion in the same upload. A
DICOM Lesion Number ("#3") is the patient's own numbering, so its name includes the patient.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.infra.db import insert_ignoring_conflicts
from dermascan.infra.schema import Lesion, utcnow
from dermascan.ingest.follow_up import clean_lesion_id, parse_visit_date
from dermascan.ingest.records import FieldError
from dermascan.ingest.types import StudyInput
from dermascan.security.identity import pseudonymise


@dataclass
class Named:
    """A study's follow-up fields, checked: the lesion's key pseudonym and the visit's date."""

    key: str | None
    acquired_at: object
    name: str | None = None  # the sender's lesion id as it is compared (trimmed; "#3": a lesion number)


def find(
    session: Session, secret: str, program_id: int, lesion_id: str, patient_id: str | None = None
) -> Lesion | None:
    """The program's lesion the sender calls ``lesion_id`` (a lesion number "#3" with its
    ``patient_id``), or None."""
    try:
        name = clean_lesion_id(lesion_id)
    except FieldError:
        return None
    if name is None or (name.startswith("#") and not (patient_id or "").strip()):
        return None
    key = lesion_key(secret, program_id, name, patient_id)
    return session.scalar(select(Lesion).where(Lesion.program_id == program_id, Lesion.key_pseudonym == key))


def lesion_key(secret: str, program_id: int, lesion_id: str, patient_id: str | None) -> str:
    """The lesion's key pseudonym. Two kinds of identifier, two key spaces that cannot spell each
    other: a lesion number ("#3") is the patient's own, keyed ``lesion:<patient>#<n>`` (no digit
    after its last '#' but the number's); a text id is the sender's, keyed ``lesion:<id>`` when it
    holds no '#' (as ever) and ``lesion-text:<id>`` when it does — so patient 7's "#3" and a text
    "7#3" are two lesions."""
    if lesion_id.startswith("#"):
        name = f"lesion:{(patient_id or '').strip()}{lesion_id}"
    else:
        name = f"lesion-text:{lesion_id}" if "#" in lesion_id else f"lesion:{lesion_id}"
    return pseudonymise(secret, program_id, name)


def check(secret: str, program_id: int, item: StudyInput) -> Named:
    """The follow-up fields of one study, or FieldError naming the field."""
    lesion_id = clean_lesion_id(item.lesion_id)
    acquired_at = parse_visit_date(item.acquired_at, item.acquired_at_field)
    if lesion_id is not None and lesion_id.startswith("#") and not (item.patient_id or "").strip():
        raise FieldError("lesion_id", f"lesion number {lesion_id[1:]} names a lesion of a patient: the patient id is missing")  # fmt: skip
    key = None if lesion_id is None else lesion_key(secret, program_id, lesion_id, item.patient_id)
    return Named(key, acquired_at, lesion_id)


class Lesions:
    """The lesions of one upload, resolved in the caller's transaction: :meth:`claim` each study's
    lesion (its id, or FieldError when the lesion belongs to another patient)."""

    def __init__(self, session: Session, program_id: int, keys: dict[str, str | None]):
        """``keys``: each lesion key of the upload → the patient pseudonym of its first study."""
        self.session = session
        self.program_id = program_id
        self.known: dict[str, Lesion] = {}
        if not keys:
            return
        # a new lesion is made once, whoever comes first (a concurrent upload waits on the key)
        insert_ignoring_conflicts(
            session, Lesion.__table__,
            [{"program_id": program_id, "key_pseudonym": k, "patient_pseudonym": p, "created_at": utcnow()}
             for k, p in keys.items()],
            ["program_id", "key_pseudonym"],
        )  # fmt: skip
        rows = session.scalars(
            select(Lesion)
            .where(Lesion.program_id == program_id, Lesion.key_pseudonym.in_(list(keys)))
            .with_for_update()
        )
        self.known = {lesion.key_pseudonym: lesion for lesion in rows}

    def claim(self, key: str, patient: str | None) -> int:
        lesion = self.known[key]
        if lesion.patient_pseudonym is None and patient is not None:
            lesion.patient_pseudonym = patient  # the first study that names its patient
        elif patient is not None and lesion.patient_pseudonym != patient:
            raise FieldError(
                "lesion_id",
                "this lesion id already names a lesion of another patient in this program: a lesion is followed "
                "within one patient (check the lesion id or the patient id)",
            )
        return lesion.id
