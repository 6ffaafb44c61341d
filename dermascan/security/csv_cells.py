"""CSV cells that a spreadsheet will not run: a text cell starting with ``= + - @``, a tab or a
carriage return is read as a formula by Excel, LibreOffice and Google Sheets (CSV injection), so
every CSV export passes its cells through :func:`safe` — the cell gets a leading apostrophe, as
OWASP recommends. Numbers stay numbers."""

from __future__ import annotations

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def safe(value):
    """The value as written to a CSV cell: None as empty, text that could be a formula quoted."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(TRIGGERS):
        return "'" + value
    return value
