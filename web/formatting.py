"""One formatting rule for every page: instants as ``2026-12-05 14:54`` (UTC), days as
``2026-12-05``, ages as whole years (``50``, or ``50.5`` when a half was given)."""

from __future__ import annotations

import datetime as dt


def _instant(value) -> dt.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
    return value.astimezone(dt.UTC) if value.tzinfo else value.replace(tzinfo=dt.UTC)


def when(value) -> str:
    """An instant (datetime or ISO text) as ``YYYY-MM-DD HH:MM`` in UTC; empty when there is none."""
    instant = _instant(value)
    return "" if instant is None else instant.strftime("%Y-%m-%d %H:%M")


def day(value) -> str:
    """A date as ``YYYY-MM-DD``; empty when there is none."""
    instant = _instant(value)
    return "" if instant is None else instant.strftime("%Y-%m-%d")


def age(value, unknown: str = "") -> str:
    """An age in years: ``50`` (``50.5`` when a half was given); ``unknown`` when there is none."""
    if value is None or value == "":
        return unknown
    try:
        years = float(value)
    except (TypeError, ValueError):
        return unknown
    return f"{years:.0f}" if years == int(years) else f"{years:.1f}"


def suspected(prediction) -> str:
    """A prediction's most likely diagnosis and its probability, for a table cell."""
    from dermascan.screening.reports import suspected as top

    found = top(prediction)
    return "" if found is None else f"{found['label'].split(' (')[0]} ({found['probability']:.0%})"


def diagnosis_label(code) -> str:
    """A recorded diagnosis: its label when it is one of the coded classes, else as recorded."""
    from dermascan.screening.reports import DIAGNOSIS_CHOICES

    return dict(DIAGNOSIS_CHOICES).get(code, "Other" if code == "other" else code or "")


def init_app(app) -> None:
    app.jinja_env.filters.update(when=when, day=day, age=age, suspected=suspected, diagnosis_label=diagnosis_label)
