"""``dermascan db``: migrations (Alembic)."""

from __future__ import annotations

import click

from dermascan.cli.common import _settings, main


# -- database ------------------------------------------------------------------------------------
@main.group()
def db():
    """Database migrations (Alembic)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx, revision):
    """Migrate the database to REVISION (default: head)."""
    from dermascan.infra import migrate

    migrate.upgrade(_settings(ctx).database_url, revision)
    click.echo(f"database at {revision}: {_redact(_settings(ctx).database_url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx, revision):
    """Migrate the database down to REVISION ('base' empties it)."""
    from dermascan.infra import migrate

    migrate.downgrade(_settings(ctx).database_url, revision)
    click.echo(f"database at {revision}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
