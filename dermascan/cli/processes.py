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
