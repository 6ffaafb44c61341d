"""``destination``: where a program's results go back as DICOM (its PACS), and their deliveries."""

from __future__ import annotations

import click

from dermascan.cli.common import _settings, main
from dermascan.infra.db import session_factory


@main.group()
def destination():
    """DICOM destinations (PACS) a program's results are sent to."""


@destination.command("add")
@click.argument("program")
@click.argument("name")
@click.option("--dimse", metavar="HOST:PORT", help="A C-STORE SCP (give --ae too).")
@click.option("--ae", "ae_title", help="The destination's AE title (DIMSE).")
@click.option("--tls", is_flag=True, help="DIMSE over TLS (DERMASCAN_DICOM_TLS_CA_FILE: the CA, else the system's).")
@click.option("--stow", "url", metavar="URL", help="A DICOMweb base URL that accepts STOW-RS.")
@click.option("--username", help="STOW-RS basic-auth user (with the secret); without it the secret is a bearer token.")
@click.option("--secret-env", metavar="VAR", help="Read the STOW-RS password or token from this environment variable.")
@click.pass_context
def destination_add(ctx, program, name, dimse, ae_title, tls, url, username, secret_env):
    """Send PROGRAM's results (AI result SR, heat map, the specialist's verified SR) to NAME."""
    import os

    from dermascan.results_out import destinations
    from dermascan.security import audit
    from dermascan.security.identity import get_or_create_program

    host = port = None
    if dimse:
        from dermascan.ingest import numbers

        host, _, port_text = dimse.rpartition(":")
        try:
            port = numbers.parse_int(port_text, "port", 1, 65535)
        except numbers.NumberError:
            host = ""
        if not host:
            raise click.BadParameter("HOST:PORT with a port from 1 to 65535", param_hint="--dimse")
    secret = None
    if secret_env:
        secret = os.environ.get(secret_env)
        if not secret:
            raise click.BadParameter(f"{secret_env} is not set", param_hint="--secret-env")
    settings = _settings(ctx, secret=True)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            row = destinations.add_destination(
                session, settings, get_or_create_program(session, program), name, host=host, port=port,
                ae_title=ae_title, tls=tls, url=url, username=username, secret=secret,
                actor=audit.command("dermascan destination add"),
            )  # fmt: skip
        except destinations.BadDestination as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"destination {name} ({row.target}) added to program {program}")


@destination.command("list")
@click.pass_context
def destination_list(ctx):
    """Every destination with its delivery counts."""
    from dermascan.results_out import delivery_status, destinations

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session:
        counts = delivery_status.status_counts(session)
        for row in destinations.listed(session):
            state = "enabled" if row.enabled else "disabled"
            tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.get(row.id, {}).items())) or "nothing sent yet"
            click.echo(f"{row.program.name}\t{row.name}\t{row.kind}\t{row.target}\t{state}\t{tally}")


@destination.command("disable")
@click.argument("program")
@click.argument("name")
@click.option("--enable", is_flag=True, help="Enable it again instead.")
@click.pass_context
def destination_disable(ctx, program, name, enable):
    """Stop (or, with --enable, resume) sending PROGRAM's results to NAME."""
    from dermascan.results_out import destinations
    from dermascan.security import audit

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        row = destinations.find_destination(session, program, name)
        if row is None:
            raise click.ClickException(f"program {program} has no destination named {name!r}")
        destinations.set_enabled(session, row, enable, audit.command("dermascan destination disable"))
    click.echo(f"destination {name} {'enabled' if enable else 'disabled'}")
