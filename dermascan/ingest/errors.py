from __future__ import annotations

from dataclasses import dataclass


class IngestError(Exception):
    """The whole input is unusable (wrong type, too large, unsafe archive). ``status`` is the HTTP
    status an API should answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Rejection:
    """One record that was not accepted, and why. ``row`` is 1-based in the caller's terms (CSV
    line, JSON index, ZIP entry)."""

    row: int | None
    reason: str
    external_id: str | None = None
    field: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}
