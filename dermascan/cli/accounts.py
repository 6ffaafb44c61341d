"""``user``, ``token`` and ``program``: accounts, API tokens and program settings."""

from __future__ import annotations

import click

from dermascan.cli.common import _settings, main
from dermascan.infra.db import session_factory
from dermascan.security.audit import command


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
    from dermascan.security.accounts import AccountError, create_user
    from dermascan.security.identity import get_or_create_program

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            program_id = get_or_create_program(session, program).id
            create_user(session, username, password, role, program_id, command("dermascan user add"))
        except AccountError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"user {username} ({role}) created")


def _change_user(ctx, username: str, **change) -> None:
    from dermascan.security.accounts import AccountError, change_user, get_user

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            click.echo(change_user(session, get_user(session, username), **change, actor=command("dermascan user")))
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
    from dermascan.security.accounts import create_token
    from dermascan.security.identity import get_or_create_program

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        _, plain = create_token(
            session, get_or_create_program(session, program).id, name, command("dermascan token create")
        )
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
    from dermascan.governance.operating_point import PrevalenceError, set_expected_prevalence
    from dermascan.security.identity import get_or_create_program

    if (value is None) == (not clear):
        raise click.UsageError("give a VALUE or --clear")
    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            program = get_or_create_program(session, name)
            set_expected_prevalence(session, program, None if clear else value, command("dermascan program prevalence"))
        except PrevalenceError as exc:
            raise click.BadParameter(str(exc), param_hint="VALUE") from exc
    click.echo(f"program {name}: expected prevalence {'cleared' if clear else value}")


@program.command("dicom-results")
@click.argument("name")
@click.option("--all-studies/--dicom-only", required=True,
              help="Send results to the program's DICOM destinations for every study, or only for those that came by DICOM.")  # fmt: skip
@click.pass_context
def program_dicom_results(ctx, name, all_studies):
    """Whether NAME's studies from the portal and the REST API get their results in its PACS too
    (under UIDs DermaScan makes and the patient's pseudonym)."""
    from dermascan.security.identity import get_or_create_program, set_dicom_results_for_all

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, name)
        set_dicom_results_for_all(session, program, all_studies, command("dermascan program dicom-results"))
    click.echo(f"program {name}: results to the PACS for {'every study' if all_studies else 'DICOM studies only'}")


@program.command("require-metadata")
@click.argument("name")
@click.option("--on/--off", "required", required=True,
              help="Refuse studies sent without age, sex or anatomic site (--on), or score them on what was given.")  # fmt: skip
@click.pass_context
def program_require_metadata(ctx, name, required):
    """Whether PROGRAM refuses studies sent without age, sex or anatomic site (off by default: the
    model scores them, and every result says which fields it was made without)."""
    from dermascan.security.identity import get_or_create_program, set_require_metadata

    settings = _settings(ctx)
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, name)
        set_require_metadata(session, program, required, command("dermascan program require-metadata"))
    click.echo(f"program {name}: {'refuses' if required else 'scores'} studies sent without age, sex or site")


@program.command("callback-secret")
@click.argument("name")
@click.pass_context
def program_callback_secret(ctx, name):
    """Issue PROGRAM a new callback signing secret and print it once (the previous one stops signing)."""
    from dermascan.security.accounts import issue_callback_secret
    from dermascan.security.identity import get_or_create_program

    settings = _settings(ctx, secret=True)
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, name)
        secret = issue_callback_secret(
            session, program, settings.secret_key, command("dermascan program callback-secret")
        )
    click.echo(secret)
