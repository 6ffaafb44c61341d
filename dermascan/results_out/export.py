"""A whole batch's results as one download — CSV, JSON or a FHIR collection Bundle — streamed: the
rows are read a page at a time (keyset on the study id, a session per page) and written as they
come, so memory stays flat however large the batch (bench/scale.py measures it to 50,000 studies)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

from sqlalchemy import select

from dermascan.infra.schema import Study
from dermascan.results_out import fhir
from dermascan.screening import reports

PAGE = 1000


def _pages(factory, batch_id: str, page: int = PAGE) -> Iterator[list[dict]]:
    last = 0
    while True:
        with factory() as session:
            rows = reports.result_rows(session, batch_id, after_id=last, limit=page)
        if not rows:
            return
        yield rows
        last = rows[-1]["study_id"]


def stream_csv(factory, batch_id: str) -> Iterator[str]:
    header = True
    for rows in _pages(factory, batch_id):
        text = reports.to_csv(rows)
        yield text if header else text.split("\n", 1)[1]
        header = False
    if header:
        yield reports.to_csv([])


def stream_json(factory, batch_id: str, summary: dict) -> Iterator[str]:
    yield '{"batch": ' + json.dumps(summary) + ', "results": ['
    first = True
    for rows in _pages(factory, batch_id):
        for row in rows:
            yield ("" if first else ",") + json.dumps(row)
            first = False
    yield "]}"


def stream_fhir(factory, batch_id: str, settings=None) -> Iterator[str]:
    yield '{"resourceType": "Bundle", "type": "collection", "entry": ['
    first, last = True, 0
    while True:
        with factory() as session:
            studies = list(
                session.scalars(
                    select(Study).where(Study.batch_id == batch_id, Study.id > last).order_by(Study.id).limit(PAGE)
                )
            )
            if not studies:
                break
            entries = fhir.study_reports(session, studies, settings)
        for report in entries:
            entry = {"fullUrl": f"urn:uuid:{uuid.uuid5(fhir.NAMESPACE, report['id'])}", "resource": report}
            yield ("" if first else ",") + json.dumps(entry)
            first = False
        last = studies[-1].id
    yield "]}"
