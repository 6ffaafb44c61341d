"""Who a study belongs to: programs (hospital sites, teledermatology programs) and the keyed
pseudonyms that stand in for patient and DICOM identifiers (never stored in clear)."""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.infra.schema import Program
from dermascan.security import keys


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


def set_require_metadata(session: Session, program: Program, required: bool, *, user_id: int | None = None,
                         by: str | None = None, ip: str | None = None) -> None:  # fmt: skip
    """Whether ``program`` refuses studies sent without age, sex or anatomic site (each such row
    with its reason), audited in the caller's transaction."""
    from dermascan.security import audit

    program.require_metadata = bool(required)
    detail = {"program": program.name, "required": bool(required)}
    audit.record(session, "program_require_metadata", user_id=user_id, object_type="program", object_id=program.id,
                 ip=ip, detail={**detail, "by": by} if by else detail)  # fmt: skip
