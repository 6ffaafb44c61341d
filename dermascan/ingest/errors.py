from __future__ import annotations

from dataclasses import dataclass

from dermascan.errors import Invalid, TooLarge


class IngestError(Invalid):
    """The whole input is unusable (wrong type, unsafe archive, a malformed body)."""


class IngestTooLarge(IngestError, TooLarge):
    """The whole input is over a size limit."""


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
