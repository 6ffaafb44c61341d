"""dermascan/ingest parsers (the fast tier): JSON records with row-level errors, multipart parts
streamed with oversized parts dropped."""

from __future__ import annotations

import io

import pytest

from dermascan.ingest import json_records
from dermascan.ingest.errors import IngestError
from dermascan.ingest.multipart import MultipartError, iter_parts
from tests.helpers import ham_inputs


def test_json_records_parser(ham_dir):
    import base64

    image = base64.b64encode(ham_inputs(ham_dir, 1)[0].image).decode()
    inputs, rejected = json_records.parse(
        {"records": [
            {"image_base64": image, "external_id": "a", "age_approx": 40, "patient_id": 7, "idempotency_key": "k" * 300},
            {"image_base64": "***", "external_id": "b"},
            {"external_id": "c"},
            "not an object",
            {"image_base64": image, "external_id": "d", "favourite_colour": "blue"},
        ]},
        max_key=200,
    )  # fmt: skip
    assert [(i.external_id, i.patient_id, len(i.idempotency_key)) for i in inputs] == [("a", "7", 200)]
    assert [(r.row, r.field) for r in rejected] == [
        (2, "image_base64"),
        (3, "image_base64"),
        (4, None),
        (5, "favourite_colour"),
    ]
    with pytest.raises(IngestError):
        json_records.parse({"rows": []})


def test_multipart_parts_stream_and_oversized_parts_are_dropped():
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 10 + b"\r\n"
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"y" * 5000 + b"\r\n--b--\r\n"
    )
    parts = list(iter_parts(io.BytesIO(body), "b", max_part_bytes=100))
    assert [(p.headers["content-type"], bytes(p.payload), p.too_large, p.size) for p in parts] == [
        ("application/dicom", b"x" * 10, False, 10),
        ("application/dicom", b"", True, 5000),
    ]
    with pytest.raises(MultipartError):
        list(iter_parts(io.BytesIO(body[:40]), "b", max_part_bytes=100))
