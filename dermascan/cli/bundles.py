"""``dermascan bundle``: the model bundles a deployment knows, and which one decides."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import select

from dermascan.cli.common import _ensure_db, _settings, main
from dermascan.infra.db import session_factory


@main.group()
def bundle():
    """Model bundles: register, list, activate, shadow, retire (every change audited)."""


@bundle.command("list")
@click.pass_context
def bundle_list(ctx):
    """The registered bundles and their state; * marks the active one."""
    from dermascan.infra.schema import ModelBundle

    settings = _settings(ctx)
    _ensure_db(settings)
    with session_factory(settings.database_url)() as session:
        for row in session.scalars(select(ModelBundle).order_by(ModelBundle.registered_at)):
            click.echo(
                f"{'*' if row.active else ' '} {row.version}  {row.state}  threshold {row.threshold:.4f}  {row.path}"
            )


@bundle.command("register")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--activate", is_flag=True, help="Also make it the bundle that scores.")
@click.pass_context
def bundle_register(ctx, path, activate):
    """Record a bundle (its checksum verified); it decides nothing until activated."""
    from dermascan.governance import bundles

    settings = _settings(ctx)
    _ensure_db(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            row = bundles.register(session, path, activate=False)
            if activate:
                bundles.activate_version(session, row.version, by="dermascan bundle register --activate")
        except ValueError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle {row.version} registered" + (" and active" if activate else ""))
    click.echo(_onnx_package(settings, path))


def _onnx_package(settings, path: Path) -> str:
    """The bundle's ONNX package for the workers' runtime: shipped inside it, or exported now into
    the data directory (a worker never exports: without a package it scores with Keras)."""
    from model.inference.bundle import read_manifest
    from model.inference.loader import onnx_package, package_folder

    manifest = read_manifest(path, verify=False)
    packages = Path(settings.data_dir) / "onnx"
    found = onnx_package(path, manifest, packages)
    if found is not None:
        return f"ONNX package: {found}"
    from model.training.export import export

    folder = package_folder(packages, manifest)
    try:
        export(path, "onnx", folder)
    except ImportError as exc:
        return (
            f"no ONNX package: exporting one needs the 'train' extra ({exc.name} is missing); "
            "workers score with Keras where it is installed"
        )
    return f"ONNX package exported to {folder}"


@bundle.command("activate")
@click.argument("version")
@click.pass_context
def bundle_activate(ctx, version):
    """Make a registered bundle the one that scores (workers with another bundle stop taking work)."""
    from dermascan.errors import DomainError
    from dermascan.governance import bundles

    settings = _settings(ctx)
    _ensure_db(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            bundles.activate_version(session, version, by="dermascan bundle activate")
        except DomainError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle {version} is active")


def _change_state(ctx, version: str, change: str) -> None:
    from dermascan.errors import DomainError
    from dermascan.governance import bundles

    settings = _settings(ctx)
    _ensure_db(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        try:
            row = getattr(bundles, f"{change}_version")(session, version, by=f"dermascan bundle {change}")
        except DomainError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"bundle {version} is {row.state}")


@bundle.command("shadow")
@click.argument("version")
@click.pass_context
def bundle_shadow(ctx, version):
    """Score every study in shadow too, beside the active bundle: stored, compared on the
    monitoring page, never a referral or a result. Workers load it from its registered path."""
    _change_state(ctx, version, "shadow")


@bundle.command("retire")
@click.argument("version")
@click.pass_context
def bundle_retire(ctx, version):
    """Stop scoring with a bundle that is in shadow or idle (its predictions stay)."""
    _change_state(ctx, version, "retire")


@bundle.command("profile")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="The development data (ISIC-2024 layout) the bundle was made from.")  # fmt: skip
@click.pass_context
def bundle_profile(ctx, path, data_dir):
    """Write the development data's profile (metadata and image statistics) into a bundle made
    before training wrote one; monitoring measures drift against it. Register the bundle again
    to load it into a running deployment."""
    from model.inference.bundle import read_manifest
    from model.inference.reference import write_profile

    manifest = read_manifest(path, verify=False)
    built = write_profile(path, data_dir, manifest["image_size"])
    click.echo(f"profile of {built['n']} development images written to {path / 'reference.json'}")


@bundle.command("threshold")
@click.argument("version")
@click.argument("value", type=float)
@click.pass_context
def bundle_threshold(ctx, version, value):
    """Move VERSION's referral threshold to VALUE (from now on; audited with the sensitivity and
    specificity its validation shows there)."""
    from dermascan.governance.operating_point import ThresholdError, set_threshold
    from dermascan.infra.schema import ModelBundle
    from dermascan.security.audit import command

    settings = _settings(ctx)
    _ensure_db(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        row = session.get(ModelBundle, version)
        if row is None:
            raise click.ClickException(f"no registered bundle {version!r}")
        try:
            point = set_threshold(session, row, value, command("dermascan bundle threshold"))
        except ThresholdError as exc:
            raise click.BadParameter(str(exc), param_hint="VALUE") from exc
    shown = (
        f"sensitivity {point['sensitivity']:.3f}, specificity {point['specificity']:.3f}" if point else "no validation"
    )
    click.echo(f"bundle {version}: referral threshold {value:.4f} ({shown} on its validation data)")
