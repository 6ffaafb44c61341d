"""JSON records (the REST API's ``application/json`` body): one object per study with the image as
base64 and the metadata columns of the CSV manifest."""

from __future__ import annotations

import base64
import binascii

from dermascan.ingest.errors import IngestError, Rejection
from dermascan.ingest.manifest import is_known_column
from dermascan.ingest.types import StudyInput


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
        external_id = record.get("external_id") or record.get("isic_id")
        external_id = None if external_id is None else str(external_id)[:200]
        encoded = record.get("image_base64")
        if not isinstance(encoded, str) or not encoded:
            rejected.append(Rejection(index, "image_base64 is missing", external_id, "image_base64"))
            continue
        try:
            image = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            rejected.append(Rejection(index, "image_base64 is not valid base64", external_id, "image_base64"))
            continue
        meta = {
            k: v for k, v in record.items() if k not in ("image_base64", "external_id", "patient_id", "idempotency_key")
        }
        unknown = [k for k in meta if not is_known_column(k)]
        if unknown:
            rejected.append(Rejection(index, f"unknown field(s) {', '.join(sorted(unknown))}", external_id, unknown[0]))
            continue
        key = record.get("idempotency_key")
        inputs.append(
            StudyInput(
                image=image, metadata=meta, external_id=external_id,
                patient_id=None if record.get("patient_id") is None else str(record["patient_id"]),
                idempotency_key=None if key is None else str(key)[:max_key], row=index,
            )
        )  # fmt: skip
    return inputs, rejected
