"""The admin's monitoring pages (issue 15): per program, the last twelve weeks of what the model
did and how it compares with its validation, drift and shadow bundles, with pictures; the monthly
governance report; and the same figures as Prometheus gauges for alerting
(``deploy/prometheus/dermascan-alerts.yml``)."""

from __future__ import annotations

import hmac

from flask import Blueprint, Response, abort, render_template, request
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from dermascan.governance import charts, monitoring, report
from dermascan.infra.schema import ModelBundle, Program, utcnow
from dermascan.ingest.numbers import NumberError
from web.helpers import db, int_arg, role_required, settings

bp = Blueprint("monitoring", __name__, url_prefix="/admin/monitoring")
RATE_DAYS, DRIFT_DAYS = 7, 28  # the gauges: rates over the last week, drift over four (more studies)


def _program() -> tuple[Program | None, list[Program]]:
    programs = monitoring.programs(db())
    try:
        wanted = int_arg("program")
    except NumberError:
        abort(404)
    chosen = next((p for p in programs if p.id == wanted), None) if wanted else None
    if wanted and chosen is None:
        abort(404)
    return chosen or (programs[0] if programs else None), programs


@bp.get("/")
@role_required("admin")
def page():
    program, programs = _program()
    if program is None:
        return render_template("admin_monitoring.html", program=None, programs=[])
    weeks = monitoring.weeks(db(), program, 12)
    recent = monitoring.rolling(db(), program, DRIFT_DAYS)
    bundle = db().get(ModelBundle, recent.bundle) if recent.bundle else None
    return render_template(
        "admin_monitoring.html", program=program, programs=programs, weeks=weeks, recent=recent,
        months=monitoring.months_with_studies(db(), program), drift_limit=monitoring.DRIFT, moved_limit=monitoring.MOVED,
        min_studies=monitoring.MIN_STUDIES,
        pictures=charts.monitoring_pictures(weeks, recent, bundle, monitoring.DRIFT),
    )  # fmt: skip


@bp.get("/report", endpoint="report")
@role_required("admin")
def report_page():
    """The monthly governance report (printable HTML) of ?program=ID&month=YYYY-MM."""
    program, _ = _program()
    if program is None:
        abort(404)
    try:
        year, month = report.month_bounds(request.args.get("month", utcnow().strftime("%Y-%m")))
    except ValueError as exc:
        return Response(str(exc), status=400, mimetype="text/plain")
    return Response(report.monthly_report(db(), program, year, month), mimetype="text/html")


def gauges() -> bytes:
    """The monitoring figures in the Prometheus text format, one series per program."""
    registry = CollectorRegistry(auto_describe=False)
    families = {
        "studies": GaugeMetricFamily("dermascan_monitor_studies", f"Studies scored in the last {RATE_DAYS} days", labels=["program"]),
        "referral_rate": GaugeMetricFamily("dermascan_monitor_referral_rate", "Share of studies referred (high risk or not assessable), last 7 days", labels=["program"]),
        "high_risk_rate": GaugeMetricFamily("dermascan_monitor_high_risk_rate", "Share of studies referred for high risk, last 7 days", labels=["program"]),
        "newly": GaugeMetricFamily("dermascan_monitor_newly_high_risk", f"Studies referred as newly high risk (not referred at the lesion's last visit), last {RATE_DAYS} days", labels=["program"]),
        "changed": GaugeMetricFamily("dermascan_monitor_changed_since_last_visit", f"Studies referred as changed since the lesion's last visit, last {RATE_DAYS} days", labels=["program"]),
        "missing": GaugeMetricFamily("dermascan_monitor_missing_metadata_share", f"Share of studies scored without age, sex or site, last {RATE_DAYS} days", labels=["program"]),
        "missing_referred": GaugeMetricFamily("dermascan_monitor_missing_metadata_high_risk_rate", f"Share referred as high risk among studies scored without age, sex or site, last {RATE_DAYS} days", labels=["program"]),
        "low": GaugeMetricFamily("dermascan_monitor_high_risk_rate_expected_low", "Lower end of the expected high-risk referral rate", labels=["program"]),
        "high": GaugeMetricFamily("dermascan_monitor_high_risk_rate_expected_high", "Upper end of the expected high-risk referral rate", labels=["program"]),
        "ppv": GaugeMetricFamily("dermascan_monitor_ppv", "Referred studies with a malignant outcome among those with an outcome, last 28 days", labels=["program"]),
        "benign": GaugeMetricFamily("dermascan_monitor_benign_decision_share", "Decided referrals decided benign / no action, last 7 days", labels=["program"]),
        "psi": GaugeMetricFamily("dermascan_monitor_psi", "Population stability index against the development data, last 28 days", labels=["program", "feature"]),
        "agreement": GaugeMetricFamily("dermascan_monitor_shadow_agreement", "Share of studies where a shadow bundle makes the same referral call, last 28 days", labels=["program", "bundle"]),
    }  # fmt: skip
    for program in monitoring.programs(db()):
        week = monitoring.rolling(db(), program, RATE_DAYS)
        month = monitoring.rolling(db(), program, DRIFT_DAYS)
        name = [program.name]
        families["studies"].add_metric(name, week.studies)
        families["newly"].add_metric(name, week.newly_high_risk)
        families["changed"].add_metric(name, week.changed)
        for key, value in (("referral_rate", week.referral_rate), ("high_risk_rate", week.high_risk_rate),
                           ("ppv", month.ppv), ("benign", week.benign_share), ("missing", week.missing_metadata_share),
                           ("missing_referred", week.missing_metadata_referral_rate)):  # fmt: skip
            if value is not None:
                families[key].add_metric(name, value)
        if week.band and week.studies >= monitoring.MIN_STUDIES:
            families["low"].add_metric(name, week.band[0])
            families["high"].add_metric(name, week.band[1])
        for feature, value in month.drift.items():
            if value is not None:
                families["psi"].add_metric([program.name, feature], value)
        for version, shadow in month.shadows.items():
            if shadow["agreement"] is not None:
                families["agreement"].add_metric([program.name, version], shadow["agreement"])

    class Collector:
        def collect(self):
            yield from families.values()

    registry.register(Collector())
    return generate_latest(registry)


@bp.get("/metrics")
def prometheus():
    """For Prometheus: with ``Authorization: Bearer $DERMASCAN_MONITORING_METRICS_TOKEN``, or as a
    logged-in admin."""
    token = settings().monitoring_metrics_token
    given = request.headers.get("Authorization", "")
    if token and given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode()):
        return Response(gauges(), mimetype="text/plain; version=0.0.4")
    return _prometheus_for_admin()


@role_required("admin")
def _prometheus_for_admin():
    return Response(gauges(), mimetype="text/plain; version=0.0.4")
