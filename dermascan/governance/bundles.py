"""The model bundles known to the database. The bundle's manifest is read without Keras, so the
portal can show the operating point; the referral threshold starts as the bundle's own and an
admin may move it (issue: operating point).

A bundle's state: ``active`` (exactly one: it decides — referrals, results, deliveries),
``shadow`` (any number: every study the active bundle scores is scored by them too, in the same
worker batch, and stored as shadow predictions that decide nothing), ``registered`` (known, idle)
or ``retired``. Every change of state is audited; activation is one transaction, so there is
never a moment with two active bundles or none."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from dermascan.errors import Conflict, NotFound
from dermascan.infra.schema import ModelBundle, utcnow
from model.inference.bundle import read_manifest

REGISTER_LOCK_KEY = 0x44534E5247  # "DSNRG": registrations of bundles take turns


def register(session: Session, bundle_dir: Path | str, activate: bool = True) -> ModelBundle:
    """Record a bundle (verifying its checksum); with ``activate`` make it the one that scores.

    Registrations take turns (a PostgreSQL advisory lock held to the end of the caller's
    transaction): workers that start together (the processes of one ``--concurrency``, a scaled
    deployment) or an admin's ``dermascan bundle register`` beside them find each other's row
    instead of inserting it again and failing on the unique key."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": REGISTER_LOCK_KEY})
    manifest = read_manifest(bundle_dir, verify=True)
    reference = Path(bundle_dir) / "reference.json"  # the development data's profile (monitoring)
    if reference.is_file():
        manifest["reference"] = json.loads(reference.read_text())
    row = session.get(ModelBundle, manifest["version"])
    if row is None:
        row = ModelBundle(
            version=manifest["version"],
            sha256=manifest["weights_sha256"],
            path=str(Path(bundle_dir).resolve()),
            manifest=manifest,
            threshold=float(manifest["threshold"]),
        )
        session.add(row)
    elif row.sha256 != manifest["weights_sha256"]:
        raise ValueError(
            f"bundle version {manifest['version']} is already registered with other weights "
            f"({row.sha256[:12]}… vs {manifest['weights_sha256'][:12]}…): give the new bundle a new version"
        )
    else:
        row.path = str(Path(bundle_dir).resolve())
        if "reference" in manifest and row.manifest.get("reference") != manifest["reference"]:
            row.manifest = manifest
    session.flush()
    if activate and not row.active:
        activate_version(session, row.version, by="registered with activation")
    return row


def active(session: Session) -> ModelBundle | None:
    return session.scalar(select(ModelBundle).where(ModelBundle.active.is_(True)))


def activate_version(
    session: Session, version: str, by_user_id: int | None = None, by: str | None = None
) -> ModelBundle:
    """Make a registered bundle the one that scores, in the caller's transaction; audited.
    Activation is an admin act (``dermascan bundle activate``, the operating-point page)."""
    from dermascan.security import audit

    row = session.get(ModelBundle, version)
    if row is None:
        raise NotFound(f"no registered bundle {version!r} (register it first: dermascan bundle register PATH)")
    before = active(session)
    if before is not None and before.version == version:
        return row
    session.execute(update(ModelBundle).where(ModelBundle.version != version).values(active=False))
    row.active, row.shadow, row.retired_at = True, False, None  # a promoted shadow stops shadowing
    audit.record(
        session, "bundle_activated", user_id=by_user_id, object_type="bundle", object_id=version,
        detail={"previous": before.version if before else None, "by": by} if by else {"previous": before.version if before else None},
    )  # fmt: skip
    session.flush()
    return row


def shadows(session: Session) -> list[ModelBundle]:
    return list(session.scalars(select(ModelBundle).where(ModelBundle.shadow.is_(True)).order_by(ModelBundle.version)))


def _change(session, version, action, by_user_id, by) -> ModelBundle:
    from dermascan.security import audit

    row = session.get(ModelBundle, version)
    if row is None:
        raise NotFound(f"no registered bundle {version!r} (register it first: dermascan bundle register PATH)")
    if row.active:
        raise Conflict(f"bundle {version} is the active bundle: activate another one first")
    audit.record(
        session, action, user_id=by_user_id, object_type="bundle", object_id=version,
        detail={"previous_state": row.state, **({"by": by} if by else {})},
    )  # fmt: skip
    return row


def shadow_version(session: Session, version: str, by_user_id: int | None = None, by: str | None = None) -> ModelBundle:
    """Score in shadow from now on: beside the active bundle, deciding nothing; audited."""
    row = _change(session, version, "bundle_shadowed", by_user_id, by)
    row.shadow, row.retired_at = True, None
    session.flush()
    return row


def retire_version(session: Session, version: str, by_user_id: int | None = None, by: str | None = None) -> ModelBundle:
    """Stop using a bundle (shadow or idle); its predictions stay; audited."""
    row = _change(session, version, "bundle_retired", by_user_id, by)
    row.shadow, row.retired_at = False, utcnow()
    session.flush()
    return row


def register_for_worker(session: Session, bundle_dir: Path | str) -> ModelBundle:
    """What a starting worker does: record its bundle without activating it — unless no bundle
    is active yet (a new deployment), when the first one is activated, audited as such. A worker
    with another bundle never takes over a deployment just by starting. Workers starting together
    take turns in :func:`register` (its lock is held to the end of the transaction, activation
    included)."""
    row = register(session, bundle_dir, activate=False)
    if active(session) is None:
        activate_version(session, row.version, by="the first worker of a deployment with no active bundle")
    return row


def listed(session: Session) -> list[ModelBundle]:
    """Every registered bundle, in the order they were registered."""
    return list(session.scalars(select(ModelBundle).order_by(ModelBundle.registered_at)))
