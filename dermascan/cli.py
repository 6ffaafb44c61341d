"""The ``dermascan`` command line.

Model commands (train, evaluate) import Keras inside the command, so ``dermascan web`` and the
other commands never load it. ``worker`` and ``web`` replace this process with Celery / gunicorn.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
from sqlalchemy import select

from dermascan.config import Settings
from dermascan.db import session_factory

log = logging.getLogger("dermascan")


def _settings(ctx, secret: bool = False) -> Settings:
    """The command's settings; ``secret``: with the installation secret (made in the embedded
    default if there is none yet) — only commands that pseudonymise, sign or serve ask for it."""
    if secret:
        ctx.obj = ctx.obj.with_secret()
    return ctx.obj


@click.group()
@click.option("--data-dir", type=click.Path(path_type=Path), help="Overrides DERMASCAN_DATA_DIR.")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def main(ctx, data_dir, verbose):
    """DermaScan: bulk skin-lesion screening (not a medical device)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {"data_dir": data_dir} if data_dir else {}
    ctx.obj = Settings.from_env(**overrides)


# -- database ------------------------------------------------------------------------------------
@main.group()
def db():
    """Database migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx, revision):
    """Migrate the database to REVISION (default: head)."""
    from dermascan import migrate

    migrate.upgrade(_settings(ctx).database_url, revision)
    click.echo(f"database at {revision}: {_redact(_settings(ctx).database_url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx, revision):
    """Migrate the database down to REVISION ('base' empties it)."""
    from dermascan import migrate

    migrate.downgrade(_settings(ctx).database_url, revision)
    click.echo(f"database at {revision}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


# -- processes -----------------------------------------------------------------------------------
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
    from dermascan.retention import purge as run_purge

    settings = _settings(ctx)
    _ensure_db(settings)
    totals = run_purge(session_factory(settings.database_url), settings.blob_dir, days, by="dermascan purge")
    click.echo(
        f"{totals['studies']} studies purged: {totals['images_deleted']} images and "
        f"{totals['heatmaps_deleted']} heat maps deleted"
    )


@main.command()
@click.pass_context
def sweep(ctx):
    """Re-send studies left queued (or stuck processing) too long."""
    from dermascan.sweeper import sweep as run_sweep

    click.echo(json.dumps(run_sweep(_settings(ctx))))


# -- submitting and results ----------------------------------------------------------------------
@main.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--program", default="default", show_default=True, help="Program or site the studies belong to.")
@click.option("--label", help="A name for the batch.")
@click.option("--limit", type=int, help="Only the first N records.")
@click.option("--interactive", is_flag=True, help="Queue as interactive work (served before bulk).")
@click.option("--idempotency-key", help="Re-running with the same key creates nothing new.")
@click.pass_context
def submit(ctx, path, program, label, limit, interactive, idempotency_key):
    """Submit a folder of images (+ manifest.csv), a ZIP, or ISIC-2024-layout data. Prints the batch id."""
    from tqdm import tqdm

    from dermascan.identity import get_or_create_program
    from dermascan.ingest import manifest
    from dermascan.ingest.errors import IngestError
    from dermascan.submission import submit as do_submit

    settings = _settings(ctx, secret=True)
    _ensure_db(settings)
    try:
        if path.is_dir() and manifest.isic_layout(path):
            inputs, rejected = manifest.from_isic_layout(path, limit)
        elif path.is_dir():
            inputs, rejected = manifest.from_folder(path, limit)
        elif path.suffix.lower() == ".zip":
            inputs, rejected = manifest.from_zip(path.read_bytes(), settings)
        else:
            raise click.UsageError(f"{path}: expected a folder, a ZIP or an ISIC-2024-layout folder")
    except IngestError as exc:
        raise click.ClickException(str(exc)) from exc
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, program).id
    with tqdm(total=len(inputs), desc="storing", unit="study", file=sys.stderr, disable=None) as bar:
        result = do_submit(
            settings, program_id, inputs, source="cli", interactive=interactive, label=label or path.name,
            idempotency_key=idempotency_key, prior_rejections=rejected, progress=bar.update,
        )  # fmt: skip
    for r in result.rejected:
        click.echo(f"rejected row {r.row} ({r.external_id or '-'}): {r.reason}", err=True)
    click.echo(
        f"{len(result.accepted)} accepted ({sum(a.duplicate for a in result.accepted)} already known), "
        f"{len(result.rejected)} rejected",
        err=True,
    )
    click.echo(result.batch_id)


@main.command()
@click.argument("batch_id")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "table"]), default="table", show_default=True)
@click.option("--wait", type=float, default=0, help="Wait up to this many seconds for the batch to finish.")
@click.pass_context
def results(ctx, batch_id, fmt, wait):
    """Print a batch's results."""
    from dermascan import reports
    from dermascan.schema import Batch

    settings = _settings(ctx)
    factory = session_factory(settings.database_url)
    deadline = time.monotonic() + wait
    while True:
        with factory() as session:
            batch = session.get(Batch, batch_id)
            if batch is None:
                raise click.ClickException(f"no batch {batch_id}")
            summary = reports.batch_summary(session, batch)
            rows = reports.result_rows(session, batch_id)
        if summary["state"] != "running" or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if fmt == "csv":
        click.echo(reports.to_csv(rows), nl=False)
    elif fmt == "json":
        click.echo(json.dumps({"batch": summary, "results": rows}, indent=2))
    else:
        click.echo(_table(rows))
        click.echo(f"\n{summary['state']}: {summary['counts']}")


def _table(rows: list[dict], extra: dict | None = None) -> str:
    header = f"{'study':>6}  {'external id':<16} {'status':<10} {'probability':>11}  {'referred':<8}"
    if extra:
        header += "  " + "  ".join(extra)
    lines = [header, "-" * len(header)]
    for row in rows:
        p = "" if row["probability"] is None else f"{row['probability']:.3f}"
        ref = "" if row["referred"] is None else ("YES" if row["referred"] else "no")
        line = f"{row['study_id']:>6}  {(row['external_id'] or '')[:16]:<16} {row['status']:<10} {p:>11}  {ref:<8}"
        if extra:
            line += "  " + "  ".join(str(f(row)) for f in extra.values())
        if row.get("error"):
            line += f"  ({row['error']})"
        if row.get("assessable") is False:
            line += f"  (not assessable: {row['not_assessable_reason']} — retake)"
        lines.append(line)
    return "\n".join(lines)


def _ensure_db(settings: Settings) -> None:
    if settings.is_embedded:
        from dermascan import migrate

        migrate.upgrade(settings.database_url)


# -- accounts ------------------------------------------------------------------------------------
@main.group()
def user():
    """Portal accounts."""


@user.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["uploader", "specialist", "admin"]), required=True)
@click.option("--program", default="default", show_default=True)
@click.password_option(help="Prompted for when not given.")
@click.pass_context
def user_add(ctx, username, role, program, password):
    """Create a portal user."""
    from dermascan.accounts import AccountError, create_user
    from dermascan.identity import get_or_create_program

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            create_user(session, username, password, role, get_or_create_program(session, program).id)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"user {username} ({role}) created")


def _change_user(ctx, username: str, **change) -> None:
    from dermascan.accounts import AccountError, change_user, get_user

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            click.echo(change_user(session, get_user(session, username), **change))
        except AccountError as exc:
            raise click.ClickException(str(exc)) from exc


@user.command("scope")
@click.argument("username")
@click.option("--all-programs/--own-program", required=True, help="Whose batches a specialist may open.")
@click.pass_context
def user_scope(ctx, username, all_programs):
    """Grant a specialist every program's batches, or limit them to their own program's (referred
    cases and their patient's other lesions are always visible to specialists)."""
    _change_user(ctx, username, all_programs=all_programs)


@user.command("disable")
@click.argument("username")
@click.pass_context
def user_disable(ctx, username):
    """Disable a user (their sessions end at once)."""
    _change_user(ctx, username, active=False)


@user.command("enable")
@click.argument("username")
@click.pass_context
def user_enable(ctx, username):
    """Enable a disabled user."""
    _change_user(ctx, username, active=True)


@user.command("reset-password")
@click.argument("username")
@click.password_option(help="Prompted for when not given.")
@click.pass_context
def user_reset_password(ctx, username, password):
    """Set a new password (the user's sessions end)."""
    _change_user(ctx, username, password=password)


@user.command("set-role")
@click.argument("username")
@click.argument("role", type=click.Choice(["uploader", "specialist", "admin"]))
@click.pass_context
def user_set_role(ctx, username, role):
    """Give a user another role (their sessions end)."""
    _change_user(ctx, username, role=role)


@main.group()
def token():
    """REST API tokens."""


@token.command("create")
@click.argument("name")
@click.option("--program", required=True, help="The program or site the token is scoped to.")
@click.pass_context
def token_create(ctx, name, program):
    """Create an API token (printed once; only its hash is stored)."""
    from dermascan.accounts import create_token
    from dermascan.identity import get_or_create_program

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        _, plain = create_token(session, get_or_create_program(session, program).id, name)
    click.echo(plain)


@main.group()
def program():
    """Programs and sites."""


@program.command("prevalence")
@click.argument("name")
@click.argument("value", type=float, required=False)
@click.option("--clear", is_flag=True, help="Show probabilities at the development data's prevalence again.")
@click.pass_context
def program_prevalence(ctx, name, value, clear):
    """Set the share of malignant lesions PROGRAM expects (e.g. 0.02): its displayed
    probabilities are re-weighed to it; the referral decision stays on the bundle's threshold."""
    from dermascan.identity import get_or_create_program
    from dermascan.operating_point import PrevalenceError, set_expected_prevalence

    if (value is None) == (not clear):
        raise click.UsageError("give a VALUE or --clear")
    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            set_expected_prevalence(session, get_or_create_program(session, name), None if clear else value)
        except PrevalenceError as exc:
            raise click.BadParameter(str(exc), param_hint="VALUE") from exc
    click.echo(f"program {name}: expected prevalence {'cleared' if clear else value}")


@program.command("callback-secret")
@click.argument("name")
@click.pass_context
def program_callback_secret(ctx, name):
    """Issue PROGRAM a new callback signing secret and print it once (the previous one stops signing)."""
    from dermascan import audit
    from dermascan.accounts import issue_callback_secret
    from dermascan.identity import get_or_create_program

    settings = _settings(ctx, secret=True)
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, name)
        secret = issue_callback_secret(program, settings.secret_key)
        audit.record(
            session, "callback_secret_issued", object_type="program", object_id=program.id,
            detail={"generation": program.callback_secret_generation, "by": "dermascan program callback-secret"},
        )  # fmt: skip
    click.echo(secret)


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
    from dermascan.dicom_scp import AllowList, DoorError, make_server, tls_context

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


# -- the model -----------------------------------------------------------------------------------
@main.command()
@click.option(
    "--data",
    "data_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="ISIC-2024 layout folder.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    help="Checkpoints, out-of-fold predictions, report (default: OUT.work).",
)
@click.option("--folds", default=3, show_default=True)
@click.option("--image-size", default=128, show_default=True)
@click.option("--epochs", default=14, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--weights", type=click.Path(exists=True, dir_okay=False), help="Local NASNetMobile weights (include_top=False)."
)
@click.option("--target-sensitivity", default=0.95, show_default=True)
@click.option(
    "--threshold-confidence",
    default=0.9,
    show_default=True,
    help="Share of bootstrap resamples of the out-of-fold positives that must reach the target sensitivity.",
)
@click.option(
    "--calibration-fraction",
    default=0.15,
    show_default=True,
    help="Share of patients held out of every fold model; the threshold and calibration are chosen there.",
)
@click.option("--max-members", type=int, help="Keep only the best N fold models in the bundle.")
@click.option("--backbone", type=click.Choice(["nasnet_mobile", "tiny"]), default="nasnet_mobile", show_default=True)
@click.option("--limit", type=int, help="Only the first N rows (smoke runs).")
@click.option("--version", help="Bundle version (default: from the date).")
@click.option(
    "--only-folds", help="Train only these folds (e.g. 0,1); the bundle is made from the folds that are done."
)
def train(
    data_dir,
    out_dir,
    work_dir,
    folds,
    image_size,
    epochs,
    batch_size,
    weights,
    target_sensitivity,
    threshold_confidence,
    calibration_fraction,
    max_members,
    backbone,
    limit,
    version,
    only_folds,
):
    """Train the fusion model with patient-grouped CV and write a model bundle (resumable)."""
    from model.train import TrainConfig
    from model.train import train as run_training

    logging.getLogger("model").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
    cfg = TrainConfig(
        image_size=image_size, folds=folds, epochs=epochs, batch_size=batch_size, weights=weights,
        target_sensitivity=target_sensitivity, threshold_confidence=threshold_confidence,
        calibration_fraction=calibration_fraction, max_members=max_members, backbone=backbone, limit=limit,
        verbose=1 if sys.stderr.isatty() else 2,
    )  # fmt: skip
    work_dir = work_dir or out_dir.with_name(out_dir.name + ".work")
    try:
        train_folds = [int(k) for k in only_folds.split(",")] if only_folds else None
    except ValueError:
        raise click.BadParameter("a comma-separated list of fold numbers", param_hint="--only-folds") from None
    manifest = run_training(data_dir, out_dir, work_dir, cfg, version, train_folds)
    oof = manifest["metrics"]["oof"]
    click.echo(f"bundle {manifest['version']} written to {out_dir}")
    cal = manifest["metrics"].get("calibration_set")
    if cal:
        op = cal["operating_point"]
        click.echo(
            f"out-of-fold AUC {oof['auc']:.4f}  pAUC80 {oof['pauc80']:.4f} (fold models on their own validation folds)"
        )
        click.echo(f"calibration set ({cal['n']} images, {cal['positives']} malignant; the shipped ensemble): AUC {cal['auc']:.4f}  "
                   f"pAUC80 {cal['pauc80']:.4f}  {manifest['calibration']['method']} calibration, ECE {cal['ece_raw']:.4f} → {cal['ece']:.4f}")  # fmt: skip
        click.echo(
            f"threshold {manifest['threshold']:.4f}: sensitivity {op['sensitivity']:.3f}, specificity {op['specificity']:.3f}"
        )
        return
    click.echo(f"out-of-fold AUC {oof['auc']:.4f}  pAUC80 {oof['pauc80']:.4f}  threshold {manifest['threshold']:.4f} "
               f"(sensitivity {oof['operating_point']['sensitivity']:.3f}, specificity {oof['operating_point']['specificity']:.3f})")  # fmt: skip


@main.command()
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Default: the configured bundle.",
)
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path), help="Write the metrics JSON here.")
@click.option("--tta/--no-tta", default=None, help="Default: as the bundle recommends.")
@click.option("--limit", type=int)
@click.pass_context
def evaluate(ctx, bundle_dir, data_dir, out_path, tta, limit):
    """AUC, pAUC80 and sensitivity/specificity at the bundle's threshold on an ISIC-2024 folder."""
    from tqdm import tqdm

    from model.data import IsicDataset
    from model.evaluate import evaluate as run_evaluation
    from model.evaluate import write

    bundle_dir = bundle_dir or _settings(ctx).model_bundle
    total = len(IsicDataset.open(data_dir, limit=limit).ids)
    with tqdm(total=total, desc="scoring", unit="img", file=sys.stderr, disable=None) as bar:
        result = run_evaluation(bundle_dir, data_dir, tta=tta, progress=bar.update, limit=limit)
    op = result["operating_point"]
    click.echo(
        f"bundle {result['bundle']} on {result['n']} images ({result['positives']} malignant), tta={result['tta']}"
    )
    click.echo(f"AUC     {result['auc']:.4f}  (95% CI {result['auc_ci95'][0]:.4f}–{result['auc_ci95'][1]:.4f})")
    click.echo(
        f"pAUC80  {result['pauc80']:.4f}  (95% CI {result['pauc80_ci95'][0]:.4f}–{result['pauc80_ci95'][1]:.4f})"
    )
    click.echo(f"at threshold {result['threshold']:.4f}: sensitivity {op['sensitivity']:.4f} ({op['tp']}/{op['tp'] + op['fn']}), "
               f"specificity {op['specificity']:.4f} ({op['tn']}/{op['tn'] + op['fp']})")  # fmt: skip
    cal, gate = result["calibration"], result["gate"]
    click.echo(f"calibration ({cal['method']}): ECE {cal['ece']:.4f}, log loss {cal['log_loss']:.4f}")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(gate["reasons"].items())) or "none"
    click.echo(
        f"not assessable: {gate['not_assessable']} of {gate['n']} ({gate['not_assessable_share']:.2%}; {reasons})"
    )
    if "assessable" in gate:
        a = gate["assessable"]
        click.echo(f"on the assessable ones: AUC {a['auc']:.4f}, sensitivity {a['operating_point']['sensitivity']:.4f}, "
                   f"specificity {a['operating_point']['specificity']:.4f}")  # fmt: skip
    out_path = out_path or Path(f"evaluation-{result['bundle']}.json")
    write(result, out_path)
    click.echo(f"written to {out_path}")


# -- the demo ------------------------------------------------------------------------------------
EXAMPLES = Path(__file__).resolve().parent / "examples"


@main.command()
@click.option("--once", is_flag=True, help="Exit after printing the table (do not serve the portal).")
@click.option("--port", default=8000, show_default=True)
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the scores.")
@click.pass_context
def demo(ctx, once, port, timeout):
    """Screen the bundled example studies end to end (worker process + portal), embedded default."""
    from dermascan import bundles, migrate, reports
    from dermascan.accounts import create_user
    from dermascan.identity import get_or_create_program
    from dermascan.ingest import manifest
    from dermascan.queue import QUEUES
    from dermascan.schema import Batch, Role, User
    from dermascan.submission import submit as do_submit

    settings = _settings(ctx, secret=True)
    click.echo(f"data directory: {settings.data_dir}")
    click.echo(f"database:       {_redact(settings.database_url)}")
    click.echo(f"queue:          {settings.broker_url.split('://')[0]}")
    click.echo(f"model bundle:   {settings.model_bundle}")
    migrate.upgrade(settings.database_url)
    password = None
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = get_or_create_program(session, "demo")
        if session.scalar(select(User).where(User.username == "admin")) is None:
            password = secrets.token_urlsafe(12)
            create_user(session, "admin", password, Role.ADMIN, program.id)
        bundles.register(session, settings.model_bundle)
        program_id = program.id

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
        deadline = time.monotonic() + timeout
        while True:
            with factory() as session:
                summary = reports.batch_summary(session, session.get(Batch, result.batch_id))
            if summary["state"] == "complete":
                break
            if worker_proc.poll() is not None:
                raise click.ClickException(
                    f"the worker exited (code {worker_proc.returncode}); see {settings.data_dir / 'worker.log'}"
                )
            if time.monotonic() > deadline:
                raise click.ClickException(f"not scored within {timeout:.0f} s: {summary['counts']}")
            time.sleep(0.5)
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
        for proc in (web_proc, worker_proc):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in (web_proc, worker_proc):
            if proc is not None:
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


if __name__ == "__main__":
    main()
