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
from dermascan.infra.db import session_factory

# -- the demo ------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@main.command()
@click.option("--once", is_flag=True, help="Exit after printing the table (do not serve the portal).")
@click.option("--port", default=8000, show_default=True)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the scores.")
@click.pass_context
def demo(ctx, once, port, timeout):
    """Screen the bundled example studies end to end (worker process + portal), embedded default."""
    from dermascan.infra.broker import QUEUES
    from dermascan.ingest import manifest
    from dermascan.intake.submission import submit as do_submit
    from dermascan.screening import reports

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
    log_path = settings.data_dir / "worker.log"
    log_path.write_bytes(b"")  # this run's log only: the demo reads the worker's start-up from it
    worker_proc = subprocess.Popen(worker_command(settings, ",".join(QUEUES), 1, True, "prefork"), env=env,
                                   stdout=open(log_path, "ab"), stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    click.echo(
        f"worker started (pid {worker_proc.pid}, log {log_path}, metrics http://127.0.0.1:{metrics_port}/metrics)"
    )
    web_proc = None
    # SIGTERM (kill, timeout, a supervisor) stops everything the demo started, as Ctrl-C does
    previous = signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    try:
        inputs, rejected = manifest.from_folder(EXAMPLES)
        diagnosis = {i.external_id: i.metadata.get("diagnosis", "") for i in inputs}
        result = do_submit(
            settings, program_id, inputs, source="demo", label="demo examples", prior_rejections=rejected
        )
        click.echo(f"submitted {len(result.accepted)} example studies as batch {result.batch_id}")
        watch = _Progress(settings, result.batch_id, worker_proc, log_path, started)
        watch.until_scored(timeout)
        with factory() as session:
            rows = reports.result_rows(session, result.batch_id)
        # the table says whether each referred example has its heat map: wait for them (seconds)
        watch.until_heatmaps(rows, timeout)
        with factory() as session:
            rows = reports.result_rows(session, result.batch_id)
            predictions = reports.latest_predictions(session, [r["study_id"] for r in rows])
        heat = {i: bool(p.heatmap_sha256) for i, p in predictions.items()}
        click.echo()
        click.echo(_table(rows, {
            "HAM10000 dx": lambda r: diagnosis.get(r["external_id"], ""),
            # the network's differential: its most likely diagnosis (bundles with the second output)
            "suspected": lambda r: (f"{top['diagnosis']} {top['probability']:.2f}"
                                    if (top := (r.get("differential") or [None])[0]) else "-"),
            "heat map": lambda r: ("yes" if heat.get(r["study_id"]) else "not yet") if r["referred"] else "-",
        }))  # fmt: skip
        if rows and rows[0]["threshold"] is not None:
            click.echo(
                f"\nreferral threshold {rows[0]['threshold']:.4f} (bundle {rows[0]['bundle_version']}); not a medical device"
            )
            click.echo(_threshold_meaning(settings, rows[0]["bundle_version"]))
        click.echo(f"{time.monotonic() - started:.0f} s from the start of the demo to the table")
        if once:
            return
        web_proc = subprocess.Popen(web_command("127.0.0.1", port, 2), env=env, start_new_session=True)
        click.echo(f"\nportal: http://127.0.0.1:{port}/")
        click.echo("login:  admin / " + (password or "(the password printed by the first demo run)"))
        click.echo("Ctrl-C stops the portal and the worker.")
        if web_proc.wait() != 0:
            raise click.ClickException(f"the portal exited (code {web_proc.returncode}): see its log above")
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop([p for p in (web_proc, worker_proc) if p is not None])


class _Progress:
    """What the demo shows while it waits: the worker's start-up lines as it logs them (loading
    the bundle, each batch shape warmed), then how many studies are scored and heat maps made."""

    def __init__(self, settings, batch_id: str, worker_proc, log_path: Path, started: float):
        self.settings, self.batch_id, self.worker_proc = settings, batch_id, worker_proc
        self.log_path, self.started, self.offset, self.last = log_path, started, 0, None
        self.factory = session_factory(settings.database_url)
        self.quiet_since = time.monotonic()
        self.doing = "starting the worker"

    def _say(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.started:5.0f} s] {text}")
        self.quiet_since = time.monotonic()

    def _poll(self, timeout: float, deadline: float, what: str) -> None:
        from dermascan.cli.processes import start_up_lines

        with open(self.log_path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        for line in start_up_lines(chunk.decode("utf-8", "replace")):
            self._say(f"worker: {line}")
            self.doing = line.rstrip("…").split(" (")[0]
        if time.monotonic() - self.quiet_since > 20:
            self._say(f"… {self.doing} (waiting for {what})" if self.doing else f"waiting for {what}…")
        if self.worker_proc.poll() is not None:
            raise click.ClickException(f"the worker exited (code {self.worker_proc.returncode}); see {self.log_path}")
        if time.monotonic() > deadline:
            raise click.ClickException(f"{what}: not done within {timeout:.0f} s (see {self.log_path})")
        time.sleep(0.5)

    def until_scored(self, timeout: float) -> None:
        from dermascan.infra.schema import Batch
        from dermascan.screening import reports

        deadline = time.monotonic() + timeout
        while True:
            with self.factory() as session:
                summary = reports.batch_summary(session, session.get(Batch, self.batch_id))
            counts = summary["counts"]
            now = (counts["done"] + counts["failed"], counts["total"])
            if now != self.last and now[0]:
                self._say(f"scored {now[0]} of {now[1]}")
            self.last = now
            if summary["state"] == "complete":
                return
            self._poll(timeout, deadline, "the scores")

    def until_heatmaps(self, rows: list[dict], timeout: float) -> None:
        from dermascan.screening import reports

        referred = [r["study_id"] for r in rows if r["referred"]]
        deadline, last = time.monotonic() + timeout, None
        while referred:
            with self.factory() as session:
                made = sum(1 for p in reports.latest_predictions(session, referred).values() if p.heatmap_sha256)
            if made != last:
                self._say(f"heat maps of the referred examples: {made} of {len(referred)}")
                last = made
            if made == len(referred):
                return
            self._poll(timeout, deadline, "the heat maps")


def _threshold_meaning(settings, version: str) -> str:
    """What the threshold means, in one line: the sensitivity it aims at and the referrals to
    expect per 1,000 studies, at the validation data's prevalence (as the model page says)."""
    from dermascan.governance import operating_point
    from dermascan.infra.schema import ModelBundle

    with session_factory(settings.database_url)() as session:
        bundle = session.get(ModelBundle, version)
        if bundle is None:
            return ""
        point = operating_point.at_threshold(bundle.manifest, bundle.threshold)
        prevalence = operating_point.validation_prevalence(bundle.manifest)
        per_1000 = operating_point.referrals_per_1000(point, prevalence)
    if not point or per_1000 is None:
        return ""
    return (
        f"it refers {point['sensitivity']:.0%} of malignant lesions and {1 - point['specificity']:.0%} of benign ones on "
        f"its validation data: about {per_1000:.0f} referrals per 1,000 studies where {prevalence:.0%} are malignant "
        "(these examples are mostly malignant, so most are referred)"
    )


def _set_up(settings) -> tuple[int, str | None]:
    """Migrate, make the demo program, an admin (password returned the first time) and the
    bundle active (the operator running the demo is the admin who activates it)."""
    from dermascan.governance import bundles
    from dermascan.infra import migrate
    from dermascan.infra.schema import Role, User
    from dermascan.security.accounts import create_user
    from dermascan.security.identity import get_or_create_program

    migrate.upgrade(settings.database_url)
    password = None
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, "demo")
        if session.scalar(select(User).where(User.username == "admin")) is None:
            password = secrets.token_urlsafe(12)
            create_user(session, "admin", password, Role.ADMIN, program.id)
        bundles.register(session, settings.model_bundle, activate=True)
        return program.id, password


def _stop(procs) -> None:
    """SIGTERM to each process the demo started (gunicorn's and Celery's own warm shutdown: they
    stop their children), SIGKILL to a process group still there after 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
