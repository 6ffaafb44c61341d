"""Security hardening, each control against a running app on PostgreSQL: CSV exports that a
spreadsheet cannot run."""

from __future__ import annotations

import csv
import io
import re

import pytest

from dermascan.infra.db import session_factory
from dermascan.security.accounts import create_token, create_user
from dermascan.security.identity import get_or_create_program
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


def _study_with_exif(settings, ham_dir) -> int:
    """A study whose uploaded JPEG carries EXIF (camera make and a GPS position)."""
    from PIL import Image

    from dermascan.ingest import manifest
    from dermascan.intake.submission import submit

    inputs, _ = manifest.from_isic_layout(ham_dir, limit=1)
    image = Image.open(io.BytesIO(inputs[0].image))
    exif = Image.Exif()
    exif[0x010F] = "PatientCam"  # Make
    exif[0x8825] = {1: "N", 2: (48.0, 12.0, 30.0)}  # GPS
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert b"PatientCam" in buffer.getvalue()
    inputs[0].image = buffer.getvalue()
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "headers").id
        create_user(session, "viewer", PASSWORD, "admin", program_id)
    return submit(settings, program_id, inputs[:1], source="test").accepted[0].study_id


def test_headers_no_caching_of_patient_data_exif_stripped_and_thumb_checked(pg_settings, app_factory, ham_dir):
    study_id = _study_with_exif(pg_settings, ham_dir)
    client = app_factory(pg_settings).test_client()
    login_page = client.get("/login")
    for name, value in (
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ):
        assert login_page.headers[name] == value
    csp = login_page.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    client.post("/login", data={"username": "viewer", "password": PASSWORD, "csrf_token": csrf(login_page.text)})
    image = client.get(f"/studies/{study_id}/image")
    assert image.status_code == 200 and image.headers["Cache-Control"] == "no-store"
    assert b"PatientCam" not in image.data and b"Exif" not in image.data[:200]
    thumb = client.get(f"/studies/{study_id}/image?thumb=64")
    assert thumb.status_code == 200 and thumb.headers["Cache-Control"] == "no-store"
    from PIL import Image

    assert max(Image.open(io.BytesIO(thumb.data)).size) <= 64
    for bad in ("-5", "0", "abc", "100000", "1e3"):
        assert client.get(f"/studies/{study_id}/image?thumb={bad}").status_code == 400, bad
    for path in ("/batches", "/admin/audit.csv", f"/studies/{study_id}/result"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path
    assert "no-store" not in client.get("/static/style.css").headers.get("Cache-Control", "")


def _login(client, username, password, ip="127.0.0.1", next_url=None):
    page = client.get("/login", environ_base={"REMOTE_ADDR": ip})
    return client.post(
        "/login" + (f"?next={next_url}" if next_url else ""),
        data={"username": username, "password": password, "csrf_token": csrf(page.text)},
        environ_base={"REMOTE_ADDR": ip},
    )


@pytest.fixture
def portal(pg_settings, app_factory):
    with session_factory(pg_settings.database_url)() as session, session.begin():
        create_user(session, "dr-target", PASSWORD, "specialist", get_or_create_program(session, "p").id)
    return pg_settings, app_factory


def test_nobody_locks_a_chosen_user_out_from_another_address(portal):
    settings, app_factory = portal
    app = app_factory(settings.replace(login_attempts_per_minute=10))
    attacker = app.test_client()
    statuses = [_login(attacker, "dr-target", "guess", ip="203.0.113.9").status_code for _ in range(11)]
    assert statuses[:10] == [401] * 10 and statuses[10] == 429
    refused = _login(attacker, "dr-target", PASSWORD, ip="203.0.113.9")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    # the user, from their own address, logs in at once
    assert _login(app.test_client(), "dr-target", PASSWORD, ip="198.51.100.7").status_code == 302


@pytest.mark.parametrize(
    "target",
    [
        "/%09/evil.example",
        "//evil.example",
        "/\\evil.example",
        "https://evil.example/",
        "/%0a/evil.example",
        "\\\\evil",
    ],
)
def test_login_never_redirects_off_site(portal, target):
    settings, app_factory = portal
    reply = _login(app_factory(settings).test_client(), "dr-target", PASSWORD, next_url=target)
    assert reply.status_code == 302 and reply.headers["Location"] == "/"


def test_login_keeps_a_path_on_the_site_and_refuses_a_large_body(portal):
    settings, app_factory = portal
    client = app_factory(settings).test_client()
    assert _login(client, "dr-target", PASSWORD, next_url="/referrals/").headers["Location"] == "/referrals/"
    big = app_factory(settings).test_client().post("/login", data={"username": "x" * (1 << 20), "password": "y"})
    assert big.status_code == 413


def test_unknown_users_cost_a_password_check(portal, monkeypatch):
    """No timing assertion: an unknown username runs the same password hash check as a real one."""
    from dermascan.security import accounts

    settings, _ = portal
    calls = []
    real = accounts.check_password_hash
    monkeypatch.setattr(accounts, "check_password_hash", lambda h, p: calls.append(h) or real(h, p))
    with session_factory(settings.database_url)() as session:
        assert accounts.authenticate(session, "nobody-by-this-name", "whatever") is None
        assert accounts.authenticate(session, "dr-target", "wrong") is None
    assert len(calls) == 2 and calls[0].split("$")[0] == calls[1].split("$")[0]  # same method and cost


def test_session_cookie_is_secure_when_configured(portal):
    settings, app_factory = portal
    reply = _login(app_factory(settings.replace(session_cookie_secure=True)).test_client(), "dr-target", PASSWORD)
    cookie = next(v for k, v in reply.headers.items() if k == "Set-Cookie" and v.startswith("session="))
    assert "Secure" in cookie and "HttpOnly" in cookie


def _cookie(client) -> str:
    return client.get_cookie("session").value


def _logged_in(client) -> bool:
    reply = client.get("/referrals/")
    return reply.status_code == 200


def test_logout_revokes_every_copy_of_the_cookie(portal):
    settings, app_factory = portal
    app = app_factory(settings)
    user = app.test_client()
    assert _login(user, "dr-target", PASSWORD).status_code == 302
    thief = app.test_client()
    thief.set_cookie("session", _cookie(user))
    assert _logged_in(thief)  # a copied cookie works while the session lives
    page = user.get("/referrals/").text
    user.post("/logout", data={"csrf_token": csrf(page)})
    assert not _logged_in(thief) and not _logged_in(user)


def test_disabling_a_user_or_resetting_the_password_ends_their_sessions(portal):
    from click.testing import CliRunner

    from dermascan.cli import main
    from dermascan.infra.schema import AuditEvent, User

    settings, app_factory = portal
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "boss", PASSWORD, "admin", get_or_create_program(session, "p").id)
        target_id = session.query(User).filter_by(username="dr-target").one().id
    app = app_factory(settings)
    user, admin = app.test_client(), app.test_client()
    _login(user, "dr-target", PASSWORD)
    _login(admin, "boss", PASSWORD)
    assert _logged_in(user)
    page = admin.get("/admin/users").text
    assert (
        admin.post(f"/admin/users/{target_id}", data={"action": "disable", "csrf_token": csrf(page)}).status_code == 302
    )
    assert not _logged_in(user)
    assert _login(app.test_client(), "dr-target", PASSWORD).status_code == 401  # disabled
    admin.post(f"/admin/users/{target_id}", data={"action": "enable", "csrf_token": csrf(page)})
    assert _login(user, "dr-target", PASSWORD).status_code == 302 and _logged_in(user)
    # from the command line: a new password ends the session; so does a new role
    runner = CliRunner(env=settings.as_env())
    done = runner.invoke(main, ["user", "reset-password", "dr-target", "--password", "another-long-pass"])
    assert done.exit_code == 0, done.output
    assert not _logged_in(user)
    assert _login(user, "dr-target", "another-long-pass").status_code == 302 and _logged_in(user)
    assert runner.invoke(main, ["user", "set-role", "dr-target", "uploader"]).exit_code == 0
    assert user.get("/referrals/").status_code == 302  # the old cookie is gone: back to the login
    assert runner.invoke(main, ["user", "disable", "nobody"]).exit_code != 0
    short = runner.invoke(main, ["user", "reset-password", "dr-target", "--password", "short"])
    assert short.exit_code != 0 and "at least 10" in short.output
    with session_factory(settings.database_url)() as session:
        changes = [e.detail["changes"] for e in session.query(AuditEvent).filter_by(action="user_changed")]
    assert changes == [["disabled"], ["enabled"], ["password reset"], ["role specialist → uploader"]]


@pytest.mark.parametrize("setting", ["session_idle_timeout_s", "session_max_age_s"])
def test_sessions_end_after_the_idle_and_absolute_timeouts(portal, setting):
    settings, app_factory = portal
    app = app_factory(settings)
    client = app.test_client()
    _login(client, "dr-target", PASSWORD)
    assert _logged_in(client)
    expired = app_factory(settings.replace(**{setting: -1})).test_client()
    expired.set_cookie("session", _cookie(client))
    assert not _logged_in(expired)


def _with_entry(archive: bytes, name: str, content: bytes) -> bytes:
    import zipfile

    buffer = io.BytesIO(archive)
    with zipfile.ZipFile(buffer, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(name, content)
    return buffer.getvalue()


def test_zip_entries_that_are_not_images_are_skipped_unread_and_each_entry_is_capped(
    pg_settings, app_factory, api_token, ham_dir
):
    from tests.ham_files import ham_zip

    _, token = api_token("zip-limits")
    headers = {"Authorization": f"Bearer {token}"}
    archive, _ = ham_zip(ham_dir, 2)
    # 150 MB of junk that compresses 1000-fold: never read (once it was read, then refused as a bomb)
    junk = _with_entry(archive, "notes/backup.bin", bytes(150 * 1024 * 1024))
    assert len(junk) < 3 * 1024 * 1024
    client = app_factory(pg_settings).test_client()
    reply = client.post("/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(junk), "a.zip")})
    assert reply.status_code == 201, reply.json
    assert reply.json["accepted"] == 2
    # an image entry over the image limit: refused by name before it is read
    small = app_factory(pg_settings.replace(max_image_bytes=20_000)).test_client()
    big = _with_entry(archive, "huge.jpg", b"\xff\xd8" + bytes(50_000))
    reply = small.post("/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(big), "b.zip")})
    assert reply.status_code == 413 and "huge.jpg" in reply.json["error"], reply.json


def test_forwarded_addresses_are_believed_only_from_configured_proxies(portal):
    """Without a trusted proxy an attacker cannot pick the address the throttle and the audit
    trail see; with one, the client's address comes from its X-Forwarded-For."""
    settings, app_factory = portal
    from dermascan.infra.schema import AuditEvent

    for proxies, forwarded, seen in ((0, "198.51.100.1", "10.0.0.2"), (1, "198.51.100.1", "198.51.100.1")):
        client = app_factory(settings.replace(trusted_proxies=proxies)).test_client()
        page = client.get("/login")
        client.post(
            "/login",
            data={"username": "dr-target", "password": "wrong", "csrf_token": csrf(page.text)},
            environ_base={"REMOTE_ADDR": "10.0.0.2"},
            headers={"X-Forwarded-For": forwarded},
        )
        with session_factory(settings.database_url)() as session:
            last = session.query(AuditEvent).order_by(AuditEvent.id.desc()).first()
        assert (last.action, last.ip) == ("login_failed", seen), proxies


def test_overlong_usernames_are_a_form_error_not_a_server_error(portal):
    settings, app_factory = portal
    client = app_factory(settings).test_client()
    reply = _login(client, "u" * 500, "x" * 20)
    assert reply.status_code in (200, 400, 401) and "Username" in reply.text


def test_api_and_stow_rs_are_rate_limited_per_token(pg_settings, app_factory, api_token):
    settings = pg_settings.replace(api_rate_limit="3 per minute", api_address_rate_limit="100 per minute")
    client = app_factory(settings).test_client()
    _, first = api_token("limited-a")
    _, second = api_token("limited-b")
    statuses = [
        client.get("/api/v1/batches", headers={"Authorization": f"Bearer {first}"}).status_code for _ in range(3)
    ]
    assert statuses == [200, 200, 200]
    refused = client.post(
        "/dicomweb/studies",
        headers={"Authorization": f"Bearer {first}", "Content-Type": "multipart/related; boundary=x"},
    )
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "error" in refused.json
    # another program's token is counted on its own
    assert client.get("/api/v1/batches", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    # and one address cannot go around the limit with made-up tokens
    per_address = app_factory(pg_settings.replace(api_address_rate_limit="2 per minute")).test_client()
    codes = [
        per_address.get("/api/v1/batches", headers={"Authorization": f"Bearer made-up-{i}"}).status_code
        for i in range(3)
    ]
    assert codes == [401, 401, 429]


def test_the_audit_csv_is_streamed_page_by_page(portal):
    settings, app_factory = portal
    from dermascan.security import audit

    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "exporter", PASSWORD, "admin", get_or_create_program(session, "p").id)
        for i in range(4500):  # more than two pages
            audit.record(session, "case_viewed", object_type="study", object_id=i)
    client = app_factory(settings).test_client()
    assert _login(client, "exporter", PASSWORD).status_code == 302
    reply = client.get("/admin/audit.csv")
    assert reply.status_code == 200 and reply.is_streamed
    rows = list(csv.DictReader(io.StringIO(reply.get_data(as_text=True))))
    viewed = [r for r in rows if r["action"] == "case_viewed"]
    assert [int(r["object_id"]) for r in viewed] == list(range(4500))
    assert [int(r["id"]) for r in rows] == sorted(int(r["id"]) for r in rows)
