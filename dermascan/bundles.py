"""The model bundles known to the database. The bundle's manifest is read without Keras, so the
portal can show the operating point; the referral threshold starts as the bundle's own and an
admin may move it (issue: operating point)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dermascan.schema import ModelBundle
from model.bundle import read_manifest


def register(session: Session, bundle_dir: Path | str, activate: bool = True) -> ModelBundle:
    """Record a bundle (verifying its checksum); with ``activate`` make it the one that scores."""
    manifest = read_manifest(bundle_dir, verify=True)
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
    if activate and not row.active:
        session.execute(update(ModelBundle).where(ModelBundle.version != row.version).values(active=False))
        row.active = True
    session.flush()
    return row


def active(session: Session) -> ModelBundle | None:
    return session.scalar(select(ModelBundle).where(ModelBundle.active.is_(True)))
