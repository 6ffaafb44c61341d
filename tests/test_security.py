"""Security hardening, each control against a running app on PostgreSQL: CSV exports that a
spreadsheet cannot run."""

from __future__ import annotations

import csv
import io
import re

from dermascan.accounts import create_token, create_user
from dermascan.db import session_factory
from dermascan.screening import get_or_create_program
from tests.ham_files import json_records

PASSWORD = "correct-horse-battery"
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)", "\tTAB", "=cmd|' /C calc'!A0"]


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def test_csv_exports_neutralise_formulas(pg_settings, app_factory, ham_dir):
    app = app_factory(pg_settings)
    with session_factory(pg_settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, "csv")
        _, token = create_token(session, program.id, "csv")
        create_user(session, "auditor", PASSWORD, "admin", program.id)
    client = app.test_client()
    records = json_records(ham_dir, len(FORMULAS))
    for record, formula in zip(records, FORMULAS, strict=True):
        record["external_id"] = formula
    headers = {"Authorization": f"Bearer {token}"}
    batch_id = client.post("/api/v1/batches", headers=headers, json={"records": records}).json["batch_id"]
    exported = client.get(f"/api/v1/batches/{batch_id}/results?format=csv", headers=headers).text
    cells = [row["external_id"] for row in csv.DictReader(io.StringIO(exported))]
    assert sorted(cells) == sorted("'" + f for f in FORMULAS)
    # a failed login with a formula for a username lands in the audit CSV quoted
    page = client.get("/login").text
    client.post("/login", data={"username": FORMULAS[-1], "password": "wrong", "csrf_token": csrf(page)})
    client.post("/login", data={"username": "auditor", "password": PASSWORD, "csrf_token": csrf(page)})
    audit = list(csv.DictReader(io.StringIO(client.get("/admin/audit.csv").text)))
    failed = [e for e in audit if e["action"] == "login_failed"]
    assert [e["object_id"] for e in failed] == ["'" + FORMULAS[-1]]
    for event in audit:
        assert not any(str(cell).startswith(("=", "+", "-", "@", "\t", "\r")) for cell in event.values())
