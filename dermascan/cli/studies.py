"""``submit`` and ``results``: studies in, results out, from the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from dermascan.cli.common import _ensure_db, _settings, main
from dermascan.infra.db import session_factory


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

    from dermascan.ingest import manifest
    from dermascan.ingest.errors import IngestError
    from dermascan.intake.submission import submit as do_submit
    from dermascan.security.identity import get_or_create_program

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
    from dermascan.infra.schema import Batch
    from dermascan.screening import reports

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
            line += "  " + "  ".join(f"{f(row)!s:<{len(name)}}" for name, f in extra.items())
        if row.get("error"):
            line += f"  ({row['error']})"
        if row.get("assessable") is False:
            line += f"  (not assessable: {row['not_assessable_reason']} — retake)"
        lines.append(line)
    return "\n".join(lines)


@main.group()
def outcomes():
    """Recorded outcomes (histopathology or not biopsied)."""


@outcomes.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--program", help="Only studies of this program (default: any).")
@click.pass_context
def outcomes_import(ctx, path, program):
    """Import a CSV of study_id,outcome,diagnosis — all rows or none; bad rows are listed."""
    from dermascan.errors import DomainError
    from dermascan.referrals import outcomes
    from dermascan.security.identity import get_or_create_program

    settings = _settings(ctx)
    _ensure_db(settings)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise click.ClickException(f"{path} is not UTF-8 text") from None
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, program).id if program else None
        try:
            report = outcomes.import_csv(session, text, program_id, source="csv")
        except outcomes.OutcomeRowsInvalid as exc:
            lines = "\n".join(f"  line {e['line']}: {e['error']}" for e in exc.errors)
            raise click.ClickException(f"{exc}\n{lines}") from exc
        except DomainError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"{report['imported']} outcomes imported")


@main.group()
def report():
    """Reports for clinical governance."""


@report.command("monthly")
@click.option("--program", "program_name", required=True)
@click.option("--month", required=True, help="YYYY-MM")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.pass_context
def report_monthly(ctx, program_name, month, out_path):
    """Write PROGRAM's monthly model governance report (HTML, printable to PDF)."""
    from sqlalchemy import select

    from dermascan.governance import report
    from dermascan.infra.schema import Program

    try:
        year, number = report.month_bounds(month)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--month") from None
    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session:
        program = session.scalar(select(Program).where(Program.name == program_name))
        if program is None:
            raise click.ClickException(f"no program named {program_name!r}")
        out_path.write_text(report.monthly_report(session, program, year, number))
    click.echo(f"report for {program_name}, {month} written to {out_path}")
