"""``dermascan check``: is what is stored consistent?

- every study whose image is kept has its image in the blob store, and its content still
  matches its sha256 (as do its DICOM header and its heat maps);
- blobs no row refers to are listed, and with ``fix`` removed — only those older than a grace
  period, so an upload in flight (blob written, row not yet committed) is never touched;
- studies still queued or processing long after they were accepted are listed (the sweeper
  should have recovered them: something is wrong).

The fault test runs it after its storm of failures and expects no damage.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from sqlalchemy import select

from dermascan.config import Settings
from dermascan.infra.blobs import BlobCorrupt, BlobError, BlobNotFound, BlobUnavailable, blob_store
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Study, StudyStatus, utcnow


@dataclass
class CheckReport:
    checked: int = 0  # blobs rows refer to, looked at
    missing: list = field(default_factory=list)  # (study id, what, digest)
    corrupt: list = field(default_factory=list)
    orphans: list = field(default_factory=list)  # (digest, age in seconds)
    young_orphans: int = 0  # unreferenced but within the grace period (an upload in flight)
    removed: int = 0
    stalled: list = field(default_factory=list)  # (study id, status, hours since accepted)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.corrupt or self.orphans or self.stalled)

    def as_dict(self) -> dict:
        return {
            "clean": self.clean, "checked": self.checked, "missing": self.missing, "corrupt": self.corrupt,
            "orphans": [d for d, _ in self.orphans], "young_orphans": self.young_orphans, "removed": self.removed,
            "stalled": self.stalled,
        }  # fmt: skip


def referenced(session) -> list[tuple[int, str, str]]:
    """(study id, what, digest) of every blob a kept study refers to."""
    out = []
    kept = Study.image_purged_at.is_(None)
    for study_id, image, header in session.execute(
        select(Study.id, Study.image_sha256, Study.dicom_header_sha256).where(kept).order_by(Study.id)
    ):
        out.append((study_id, "image", image))
        if header:
            out.append((study_id, "dicom header", header))
    for study_id, heatmap in session.execute(
        select(Prediction.study_id, Prediction.heatmap_sha256)
        .join(Study, Study.id == Prediction.study_id)
        .where(kept, Prediction.heatmap_sha256.is_not(None))
    ):
        out.append((study_id, "heat map", heatmap))
    return out


def check(
    settings: Settings,
    *,
    fix: bool = False,
    verify: bool = True,
    grace_s: float = 3600,
    stalled_after_s: float = 6 * 3600,
) -> CheckReport:
    """Check the store against the database (see the module docstring); ``verify`` reads every blob
    and compares its sha256 (without it, only existence is checked)."""
    report = CheckReport()
    blobs = blob_store(settings)
    factory = session_factory(settings.database_url)
    with factory() as session:
        rows = referenced(session)
        stale_before = utcnow() - dt.timedelta(seconds=stalled_after_s)
        for study_id, status, created in session.execute(
            select(Study.id, Study.status, Study.created_at)
            .where(Study.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]), Study.created_at < stale_before)
            .order_by(Study.id)
        ):
            created = created if created.tzinfo else created.replace(tzinfo=dt.UTC)
            hours = (utcnow() - created).total_seconds() / 3600
            report.stalled.append((study_id, StudyStatus(status).value, round(hours, 1)))
    wanted = {digest for _, _, digest in rows}
    seen: dict[str, bool] = {}
    for study_id, what, digest in rows:
        if digest not in seen:
            seen[digest] = _blob_ok(blobs, digest, verify, report)
            report.checked += 1
        if seen[digest] is False:
            report.missing.append((study_id, what, digest))
        elif seen[digest] is None:
            report.corrupt.append((study_id, what, digest))
    for digest, age in blobs.listing():
        if digest in wanted:
            continue
        if age < grace_s:
            report.young_orphans += 1
            continue
        report.orphans.append((digest, round(age)))
    if fix:
        with factory() as session:  # again, now: a row that appeared since the listing keeps its blob
            still = {d for _, _, d in referenced(session)}
        for digest, _ in report.orphans:
            if digest not in still and blobs.delete(digest):
                report.removed += 1
    return report


def _blob_ok(blobs, digest: str, verify: bool, report: CheckReport) -> bool | None:
    """True: there and sound; False: missing; None: damaged. BlobUnavailable propagates."""
    try:
        if verify:
            blobs.get(digest)
            return True
        return blobs.exists(digest)
    except BlobUnavailable:
        raise
    except BlobNotFound:
        return False
    except BlobCorrupt:
        return None
    except BlobError:
        return False
