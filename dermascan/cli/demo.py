"""``dermascan demo``: the embedded default end to end — migrate, start a worker and the portal,
submit the examples, print their scores."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import click
from sqlalchemy import select

from dermascan.cli.common import _settings, main
from dermascan.cli.database import _redact
from dermascan.cli.processes import web_command, worker_command
from dermascan.cli.studies import _table
from dermascan.db import session_factory

# -- the demo ------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@main.command()
@click.option("--once", is_flag=True, help="Exit after printing the table (do not serve the portal).")
@click.option("--port", default=8000, show_default=True)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the scores.")
@click.pass_context
def demo(ctx, once, port, timeout):
    """Screen the bundled example studies end to end (worker process + portal), embedded default."""
    from dermascan import reports
    from dermascan.ingest import manifest
    from dermascan.queue import QUEUES
    from dermascan.submission import submit as do_submit

    settings = _settings(ctx, secret=True)
    click.echo(f"data directory: {settings.data_dir}")
    click.echo(f"database:       {_redact(settings.database_url)}")
    click.echo(f"queue:          {settings.broker_url.split('://')[0]}")
    click.echo(f"model bundle:   {settings.model_bundle}")
    program_id, password = _set_up(settings)
    factory = session_factory(settings.database_url)

    metrics_port = _free_port()
    env = {
        **os.environ,
        **settings.as_env(),
        "DERMASCAN_METRICS_PORT": str(metrics_port),
        "DERMASCAN_WORKER_METRICS_URLS": f"http://127.0.0.1:{metrics_port}/metrics",
    }
    worker_proc = subprocess.Popen(worker_command(settings, ",".join(QUEUES), 1, True, "prefork"), env=env,
                                   stdout=open(settings.data_dir / "worker.log", "ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    click.echo(f"worker started (pid {worker_proc.pid}, log {settings.data_dir / 'worker.log'}, "
               f"metrics http://127.0.0.1:{metrics_port}/metrics)")  # fmt: skip
    web_proc = None
    # SIGTERM (kill, timeout, a supervisor) stops everything the demo started, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        inputs, rejected = manifest.from_folder(EXAMPLES)
        diagnosis = {i.external_id: i.metadata.get("diagnosis", "") for i in inputs}
        result = do_submit(
            settings, program_id, inputs, source="demo", label="demo examples", prior_rejections=rejected
        )
        click.echo(f"submitted {len(result.accepted)} example studies as batch {result.batch_id}; waiting for scores…")
        _wait_until_scored(settings, result.batch_id, worker_proc, timeout)
        with factory() as session:
            rows = reports.result_rows(session, result.batch_id)
        click.echo()
        click.echo(_table(rows, {"HAM10000 dx": lambda r: diagnosis.get(r["external_id"], "")}))
        if rows and rows[0]["threshold"] is not None:
            click.echo(
                f"\nreferral threshold {rows[0]['threshold']:.4f} (bundle {rows[0]['bundle_version']}); not a medical device"
            )
        if once:
            return
        web_proc = subprocess.Popen(web_command("127.0.0.1", port, 2), env=env, start_new_session=True)
        click.echo(f"\nportal: http://127.0.0.1:{port}/")
        click.echo("login:  admin / " + (password or "(the password printed by the first demo run)"))
        click.echo("Ctrl-C stops the portal and the worker.")
        web_proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop([p for p in (web_proc, worker_proc) if p is not None])


def _set_up(settings) -> tuple[int, str | None]:
    """Migrate, make the demo program, an admin (password returned the first time) and the
    bundle active (the operator running the demo is the admin who activates it)."""
    from dermascan import bundles, migrate
    from dermascan.accounts import create_user
    from dermascan.identity import get_or_create_program
    from dermascan.schema import Role, User

    migrate.upgrade(settings.database_url)
    password = None
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, "demo")
        if session.scalar(select(User).where(User.username == "admin")) is None:
            password = secrets.token_urlsafe(12)
            create_user(session, "admin", password, Role.ADMIN, program.id)
        bundles.register(session, settings.model_bundle, activate=True)
        return program.id, password


def _wait_until_scored(settings, batch_id: str, worker_proc, timeout: float) -> None:
    from dermascan import reports
    from dermascan.schema import Batch

    factory = session_factory(settings.database_url)
    deadline = time.monotonic() + timeout
    while True:
        with factory() as session:
            summary = reports.batch_summary(session, session.get(Batch, batch_id))
        if summary["state"] == "complete":
            return
        if worker_proc.poll() is not None:
            raise click.ClickException(
                f"the worker exited (code {worker_proc.returncode}); see {settings.data_dir / 'worker.log'}"
            )
        if time.monotonic() > deadline:
            raise click.ClickException(f"not scored within {timeout:.0f} s: {summary['counts']}")
        time.sleep(0.5)


def _stop(procs) -> None:
    """SIGTERM to each process group the demo started, SIGKILL to any still there after 20 s."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
