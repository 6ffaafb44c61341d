"""The command group, its settings and the helpers every command module shares."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from dermascan.config import Settings

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


def _ensure_db(settings: Settings) -> None:
    if settings.is_embedded:
        from dermascan.infra import migrate

        migrate.upgrade(settings.database_url)
