"""The long-running processes: ``worker``, ``web``, ``dicom-scp``, and the sweeper's ``sweep`` and ``purge``."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import click

from dermascan.cli.common import _ensure_db, _settings, main
from dermascan.config import Settings
from dermascan.infra.db import session_factory


# -- processes -----------------------------------------------------------------------------------
def start_up_lines(log_text: str) -> list[str]:
    """The start-up lines in a worker's log (what it logged after ``queue.STARTING``)."""
    from dermascan.infra.broker import STARTING

    return [line.split(STARTING, 1)[1].strip() for line in log_text.splitlines() if STARTING in line]


def worker_command(settings: Settings, queues: str, concurrency: int, beat: bool, pool: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
        "--queues", queues, "--concurrency", str(concurrency), "--pool", pool,
        "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--hostname", f"dermascan-{os.getpid()}@%h",
    ]  # fmt: skip
    if beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        cmd += ["--beat", "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    return cmd


@main.command()
@click.option(
    "--queues",
    default="interactive,bulk,maintenance,callbacks",
    show_default=True,
    help="Served in this order (a deployment may serve callbacks by a worker of their own).",
)
@click.option("--concurrency", type=int, default=None, help="Worker processes (default DERMASCAN_WORKER_CONCURRENCY).")
@click.option("--beat/--no-beat", default=False, help="Also run the sweeper schedule (one per deployment).")
@click.option("--pool", default="prefork", show_default=True)
@click.pass_context
def worker(ctx, queues, concurrency, beat, pool):
    """Run a Celery worker that scores studies."""
    settings = _settings(ctx)
    cmd = worker_command(settings, queues, concurrency or settings.worker_concurrency, beat, pool)
    os.execvpe(cmd[0], cmd, {**os.environ, **settings.as_env(), "DERMASCAN_WORKER_QUEUES": queues})


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=2, show_default=True)
@click.pass_context
def web(ctx, host, port, workers):
    """Serve the portal, the REST API and DICOMweb with gunicorn."""
    settings = _settings(ctx)
    cmd = web_command(host, port, workers)
    os.execvpe(cmd[0], cmd, {**os.environ, **settings.as_env()})


def web_command(host: str, port: int, workers: int) -> list[str]:
    return [
        sys.executable, "-m", "gunicorn", "--bind", f"{host}:{port}", "--workers", str(workers),
        "--threads", "4", "--timeout", "300", "--access-logfile", "-", "web:create_app()",
    ]  # fmt: skip


@main.command()
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0, min_open=True),
    required=True,
    help="Days since a study finished.",
)
@click.pass_context
def purge(ctx, days):
    """Delete the images and heat maps of studies finished more than DAYS ago whose referral, if
    any, is decided (results, decisions and the audit trail are kept; audited)."""
    from dermascan.infra.blobs import blob_store
    from dermascan.upkeep.retention import purge as run_purge

    settings = _settings(ctx)
    _ensure_db(settings)
    totals = run_purge(session_factory(settings.database_url), blob_store(settings), days, by="dermascan purge")
    click.echo(
        f"{totals['studies']} studies purged: {totals['images_deleted']} images and "
        f"{totals['heatmaps_deleted']} heat maps deleted"
    )


@main.command()
@click.pass_context
def sweep(ctx):
    """Re-send studies whose message was lost or whose worker's lease ran out (workers do this on
    their own every DERMASCAN_SWEEP_INTERVAL_S; this is the same sweep, once, now)."""
    from dermascan.upkeep.sweeper import guarded_sweep

    result = guarded_sweep(_settings(ctx))
    click.echo(json.dumps(result if result is not None else {"skipped": "another sweep is running"}))


@main.command("dicom-scp")
@click.option(
    "--ae-title", default="DERMASCAN", show_default=True, help="Our AE title; associations to another are rejected."
)
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=11112, show_default=True)
@click.option("--program", default="dicom", show_default=True, help="Program of entries that name none.")
@click.option(
    "--allow",
    "allowed",
    multiple=True,
    envvar="DERMASCAN_DICOM_ALLOW",
    help="AE[@ADDRESS-OR-NETWORK][=PROGRAM]: a calling AE title that may store, optionally only from that "
    "address or network, into that program (repeat, or comma-separate; env DERMASCAN_DICOM_ALLOW).",
)
@click.option("--allow-any", is_flag=True, help="Accept every calling AE from anywhere (demos only).")
@click.option("--tls-cert", envvar="DERMASCAN_DICOM_TLS_CERT", type=click.Path(exists=True, dir_okay=False))
@click.option("--tls-key", envvar="DERMASCAN_DICOM_TLS_KEY", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--tls-ca",
    envvar="DERMASCAN_DICOM_TLS_CA",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificates: callers must present a certificate they signed.",
)
@click.pass_context
def dicom_scp(ctx, ae_title, host, port, program, allowed, allow_any, tls_cert, tls_key, tls_ca):
    """Run the DICOM C-STORE receiver (C-ECHO, VL Photographic and Dermoscopic Photography)."""
    from dermascan.intake.dicom_scp import AllowList, DoorError, make_server, tls_context

    try:
        allow = AllowList.from_entries(allowed, program, allow_any)
        tls = tls_context(tls_cert, tls_key, tls_ca)
    except DoorError as exc:
        raise click.UsageError(str(exc)) from exc
    settings = _settings(ctx, secret=True)
    _ensure_db(settings)
    server = make_server(settings, ae_title, host, port, allow, tls)
    callers = (
        "any caller (--allow-any)"
        if allow.allow_any
        else ", ".join(f"{c.ae_title}@{c.network or 'any address'}→{c.program}" for c in allow.callers)
    )
    click.echo(
        f"DICOM C-STORE receiver {ae_title} listening on {host}:{port}{' (TLS)' if tls else ''}; callers: {callers}"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


@main.command()
@click.option("--fix", is_flag=True, help="Remove the blobs no row refers to (older than the grace period).")
@click.option("--quick", is_flag=True, help="Check that blobs exist, without reading them to compare their sha256.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=3600, show_default=True,
              help="Seconds an unreferenced blob is left alone (an upload in flight).")  # fmt: skip
@click.option("--stalled-after", "stalled_h", type=click.FloatRange(min=0), default=6.0, show_default=True,
              help="Hours after which a study still queued or processing is listed.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
@click.pass_context
def check(ctx, fix, quick, grace_s, stalled_h, as_json):
    """Check what is stored: every kept study's image, DICOM header and heat map in the blob store
    with its sha256; blobs no row refers to; studies with no result far too long. Exit 1 when not clean."""
    from dermascan.upkeep.check import check as run_check

    settings = _settings(ctx)
    _ensure_db(settings)
    report = run_check(settings, fix=fix, verify=not quick, grace_s=grace_s, stalled_after_s=stalled_h * 3600)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(f"{report.checked} blobs checked{' (existence only)' if quick else ' (sha256 read back)'}")
        for study_id, what, digest in report.missing:
            click.echo(f"MISSING  study {study_id}: its {what} {digest}")
        for study_id, what, digest in report.corrupt:
            click.echo(f"DAMAGED  study {study_id}: its {what} {digest} no longer matches its sha256")
        for digest, age in report.orphans:
            click.echo(f"ORPHAN   blob {digest} ({age / 3600:.1f} h old) no row refers to{' — removed' if fix else ''}")
        for study_id, status, hours in report.stalled:
            click.echo(f"STALLED  study {study_id} still {status} {hours} h after it was accepted")
        if report.young_orphans:
            click.echo(
                f"{report.young_orphans} unreferenced blob(s) younger than {grace_s:.0f} s left alone (uploads in flight)"
            )
        click.echo("clean" if report.clean else ("fixed: " if fix else "") + "not clean")
    if not report.clean and not (fix and not (report.missing or report.corrupt or report.stalled)):
        ctx.exit(1)
