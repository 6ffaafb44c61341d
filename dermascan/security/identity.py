"""Who a study belongs to: programs (hospital sites, teledermatology programs) and the keyed
pseudonyms that stand in for patient and DICOM identifiers (never stored in clear)."""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.infra.schema import Program
from dermascan.security import keys
from dermascan.security.audit import SYSTEM, Actor


def pseudonymise(secret_key: str, program_id: int, patient_id: str | None) -> str | None:
    """A stable, non-reversible patient pseudonym: HMAC-SHA256 under the pseudonym key that
    ``dermascan.security.keys`` derives from the installation secret (not the session key: rotating that
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


def programs(session: Session) -> list[Program]:
    """Every program, by name."""
    return list(session.scalars(select(Program).order_by(Program.name)))


def set_require_metadata(session: Session, program: Program, required: bool, actor: Actor = SYSTEM) -> None:
    """Whether ``program`` refuses studies sent without age, sex or anatomic site (each such row
    with its reason), audited in the caller's transaction."""
    program.require_metadata = bool(required)
    actor.record(session, "program_require_metadata", object_type="program", object_id=program.id,
                 detail={"program": program.name, "required": bool(required)})  # fmt: skip


def set_dicom_results_for_all(session: Session, program: Program, every_study: bool, actor: Actor = SYSTEM) -> None:
    """Whether the program's portal and API studies get their results in its PACS too (not only
    the studies that came by DICOM), audited in the caller's transaction."""
    program.dicom_results_for_all = bool(every_study)
    actor.record(session, "program_dicom_results", object_type="program", object_id=program.id,
                 detail={"all_studies": bool(every_study)})  # fmt: skip
