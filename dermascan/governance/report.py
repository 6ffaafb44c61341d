"""The monthly report for a program's clinical governance committee: one self-contained HTML page
(printable to PDF from any browser) with the month's figures and pictures, the deciding bundle's
validation figures beside the observed ones, the drift checks, the shadow bundles, and the
changes made that month from the audit trail. The admin page serves it; ``dermascan report
monthly`` writes it to a file."""

from __future__ import annotations

import datetime as dt
import re

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dermascan.governance import charts, monitoring, operating_point
from dermascan.infra.schema import AuditEvent, ModelBundle, Program, utcnow
from model.inference import reference

CHANGES = ("bundle_activated", "bundle_shadowed", "bundle_retired", "threshold_changed", "program_prevalence_set",
           "program_dicom_results", "destination_added", "destination_disabled", "destination_enabled")  # fmt: skip


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("dermascan.governance", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v, digits=1: "–" if v is None else f"{100 * v:.{digits}f} %"
    env.filters["num"] = lambda v, digits=3: "–" if v is None else f"{v:.{digits}f}"
    return env


def month_bounds(value: str) -> tuple[int, int]:
    """'2026-11' → (2026, 11); ValueError with a clear message otherwise (years 2000–2999: a
    report covers a month that can have studies, and the month after it must exist too)."""
    text = str(value or "")
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}", text):
        raise ValueError(f"a month is written YYYY-MM, not {text[:20]!r}")
    year, month = int(text[:4]), int(text[5:])
    if not (2000 <= year <= 2999 and 1 <= month <= 12):
        raise ValueError(f"a month is YYYY-MM with a year from 2000 to 2999, not {text!r}")
    return year, month


def changes(session: Session, program: Program, start: dt.datetime, end: dt.datetime) -> list[AuditEvent]:
    """Changes to the model and to this program's settings in [start, end), from the audit trail."""
    query = select(AuditEvent).where(
        AuditEvent.at >= start,
        AuditEvent.at < end,
        AuditEvent.action.in_(CHANGES),
        or_(AuditEvent.object_type == "bundle", AuditEvent.object_id == str(program.id), AuditEvent.object_type == "destination"),
    )  # fmt: skip
    return list(session.scalars(query.order_by(AuditEvent.at)))


def validation_figures(bundle: ModelBundle | None) -> dict:
    if bundle is None:
        return {}
    manifest = bundle.manifest or {}
    metrics = manifest.get("metrics") or {}
    held_out = metrics.get("calibration_set") or metrics.get("oof") or {}
    point = operating_point.at_threshold(manifest, bundle.threshold) or {}
    prevalence = operating_point.validation_prevalence(manifest)
    return {
        "version": bundle.version, "threshold": bundle.threshold, "n": held_out.get("n"), "auc": held_out.get("auc"),
        "pauc80": held_out.get("pauc80"), "ece": held_out.get("ece"), "sensitivity": point.get("sensitivity"),
        "specificity": point.get("specificity"), "prevalence": prevalence,
        "referrals_per_1000": operating_point.referrals_per_1000(point, prevalence),
        "ppv": (prevalence * point["sensitivity"] / (prevalence * point["sensitivity"] + (1 - prevalence) * (1 - point["specificity"])))
        if point and prevalence and point["sensitivity"] else None,
    }  # fmt: skip


def monthly_report(session: Session, program: Program, year: int, month: int, now: dt.datetime | None = None) -> str:
    start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
    end = dt.datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=dt.UTC)
    whole = monitoring.window(session, program, start, end)
    weeks, cursor = [], monitoring.week_start(start)
    while cursor < end:
        weeks.append(monitoring.window(session, program, max(cursor, start), min(cursor + dt.timedelta(weeks=1), end)))
        cursor += dt.timedelta(weeks=1)
    bundle = session.get(ModelBundle, whole.bundle) if whole.bundle else session.scalar(
        select(ModelBundle).where(ModelBundle.active.is_(True))
    )  # fmt: skip
    return _environment().get_template("monthly_report.html").render(
        program=program, title=start.strftime("%B %Y"), whole=whole, weeks=weeks,
        validation=validation_figures(bundle), changes=changes(session, program, start, end),
        generated=(now or utcnow()).strftime("%Y-%m-%d %H:%M UTC"), drift_limit=reference.DRIFT,
        moved_limit=reference.MOVED, min_studies=reference.MIN_STUDIES,
        pictures=charts.monitoring_pictures(weeks, whole, bundle, reference.DRIFT) if whole.studies else {},
    )  # fmt: skip
