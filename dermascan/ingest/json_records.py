"""JSON records (the REST API's ``application/json`` body): one object per study with the image as
base64 and the metadata columns of the CSV manifest."""

from __future__ import annotations

import base64
import binascii

from dermascan.ingest import edge_results, follow_up
from dermascan.ingest.errors import IngestError, Rejection
from dermascan.ingest.manifest import is_known_column
from dermascan.ingest.types import StudyInput


class _NotText(ValueError):
    pass


def _text(value, most: int) -> str | None:
    """An identifier given as text or a number → text (at most ``most`` characters); an object,
    a list or an integer too long to write raises _NotText."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _NotText
    if isinstance(value, int) and abs(value) >= 10**most:
        raise _NotText
    return str(value)[:most]


def parse(payload, max_key: int = 200) -> tuple[list[StudyInput], list[Rejection]]:
    """``{"records": [...]}`` → study inputs and the records' rejections (row = position, from 1).
    A body without a ``records`` list raises IngestError."""
    records = payload.get("records") if isinstance(payload, dict) else None
    if not isinstance(records, list):
        raise IngestError('the JSON body needs a "records" list')
    inputs, rejected = [], []
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            rejected.append(Rejection(index, "a record must be a JSON object"))
            continue
        try:
            external_id = _text(record.get("external_id") or record.get("isic_id"), 200)
            patient_id = _text(record.get("patient_id"), 200)
            key = _text(record.get("idempotency_key"), max_key)
        except _NotText:
            rejected.append(Rejection(index, "external_id, isic_id, patient_id and idempotency_key must be text"))
            continue
        encoded = record.get("image_base64")
        if not isinstance(encoded, str) or not encoded:
            rejected.append(Rejection(index, "image_base64 is missing", external_id, "image_base64"))
            continue
        try:
            image = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            rejected.append(Rejection(index, "image_base64 is not valid base64", external_id, "image_base64"))
            continue
        try:
            edge_result = edge_results.clean(record.get("edge_result"))
        except IngestError as exc:
            rejected.append(Rejection(index, str(exc), external_id, "edge_result"))
            continue
        meta = {
            k: v
            for k, v in record.items()
            if k not in ("image_base64", "external_id", "patient_id", "idempotency_key", "edge_result")
        }
        unknown = sorted(str(k)[:60] for k in meta if not is_known_column(k))
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            rejected.append(Rejection(index, f"unknown field(s) {shown}", external_id, unknown[0]))
            continue
        lesion_id, acquired_at, date_field = follow_up.from_record(record)
        inputs.append(
            StudyInput(
                image=image, metadata=meta, external_id=external_id, patient_id=patient_id,
                idempotency_key=key, row=index, edge_result=edge_result,
                lesion_id=lesion_id, acquired_at=acquired_at, acquired_at_field=date_field,
            )
        )  # fmt: skip
    return inputs, rejected
