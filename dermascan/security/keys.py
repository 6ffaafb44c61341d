"""One key per purpose, derived from the installation secret with HKDF (RFC 5869).

The installation secret (``DERMASCAN_SECRET_KEY``) is never used as a key itself. Each purpose
gets its own key, so knowing one tells nothing about another:

- ``session`` — Flask's session cookie and CSRF tokens. ``DERMASCAN_SESSION_KEY_VERSION``
  rotates it alone (every portal session ends) without touching the others.
- ``pseudonym`` — the HMAC key of patient and DICOM identifier pseudonyms; never rotated with
  the session key, or the same patient would get a new pseudonym.
- ``dicom-header`` — encrypts the DICOM headers kept for results sent back to the PACS.
- ``dicom-uid`` — part of the UIDs made for studies that did not arrive by DICOM (unique to
  the installation, not guessable from a study id).
- ``dicom-destination`` — encrypts the STOW-RS passwords and tokens of DICOM destinations.
- ``callback:<program>:<generation>`` — each program's own completion-callback signing secret:
  a program that verifies its callbacks learns nothing that signs a session or another
  program's callbacks. ``dermascan program callback-secret`` issues a new generation.
"""

from __future__ import annotations

from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SALT = b"dermascan-keys-v1"
CALLBACK_PREFIX = "whsec_"


@lru_cache(maxsize=256)
def derive(secret: str, purpose: str, length: int = 32) -> bytes:
    if not secret:
        raise ValueError("no installation secret key (DERMASCAN_SECRET_KEY) to derive keys from")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=SALT, info=purpose.encode()).derive(secret.encode())


def session_key(secret: str, version: int = 0) -> str:
    return derive(secret, f"session:{version}").hex()


def pseudonym_key(secret: str) -> bytes:
    return derive(secret, "pseudonym")


@lru_cache(maxsize=16)
def _fernet(secret: str, purpose: str):
    import base64

    from cryptography.fernet import Fernet

    return Fernet(base64.urlsafe_b64encode(derive(secret, purpose)))


def header_cipher(secret: str):
    """The cipher (Fernet: AES-128-CBC + HMAC) of stored DICOM headers, which hold the patient's
    identifiers as received: kept only so results can go back to the PACS filed with the image."""
    return _fernet(secret, "dicom-header")


def destination_cipher(secret: str):
    """The cipher of DICOM destinations' STOW-RS credentials (stored in the database)."""
    return _fernet(secret, "dicom-destination")


def callback_secret(secret: str, program_id: int, generation: int) -> str:
    return CALLBACK_PREFIX + derive(secret, f"callback:{program_id}:{generation}").hex()
