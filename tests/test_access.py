"""Every route × every role (and anonymous): allowed or refused as designed, in one table.
And a form posted without its CSRF token is refused."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from dermascan.governance import bundles
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Study, StudyStatus
from dermascan.screening import results
from dermascan.security.accounts import create_token, create_user
from dermascan.security.identity import get_or_create_program

ROLES = ("anonymous", "uploader", "specialist", "admin")
PASSWORD = "correct-horse-battery"
PUBLIC, TOKEN = "public", "token"
U, S, A = "uploader", "specialist", "admin"

# endpoint → (method, path template, who may use it)
TABLE = {
    "static": ("GET", "/static/style.css", PUBLIC),
    "auth.login": ("GET", "/login", PUBLIC),
    "portal.favicon": ("GET", "/favicon.ico", PUBLIC),
    "auth.logout": ("POST", "/logout", PUBLIC),
    "portal.index": ("GET", "/", (U, S, A)),
    "portal.batches": ("GET", "/batches", (U, S, A)),
    "portal.upload": ("GET", "/upload", (U, A)),
    "portal.template": ("GET", "/upload/template.csv", (U, A)),
    "portal.upload_single": ("POST", "/upload/single", (U, A)),
    "portal.upload_bulk": ("POST", "/upload/bulk", (U, A)),
    "portal.batch": ("GET", "/batches/{batch}", (U, S, A)),
    "portal.batch_status": ("GET", "/batches/{batch}/status.json", (U, S, A)),
    "portal.batch_results": ("GET", "/batches/{batch}/results.csv", (U, S, A)),
    "portal.study_image": ("GET", "/studies/{study}/image", (U, S, A)),
    "portal.study_heatmap": ("GET", "/studies/{study}/heatmap", (S, A)),
    "portal.study_result": ("GET", "/studies/{study}/result", (U, S, A)),
    "referrals.queue": ("GET", "/referrals/", (S, A)),
    "referrals.claim_next": ("POST", "/referrals/claim", (S, A)),
    "referrals.claim": (
        "POST",
        "/referrals/{referral}/claim",
        (S, A),
    ),  # before release: the loop claims, then releases
    "referrals.case": ("GET", "/referrals/{referral}", (S, A)),
    "referrals.decide": ("POST", "/referrals/{referral}/decide", (S, A)),
    "referrals.release": ("POST", "/referrals/{referral}/release", (S, A)),
    "referrals.record_outcome": ("POST", "/referrals/{referral}/outcome", (S, A)),
    "referrals.hand_over": ("POST", "/referrals/{referral}/hand-over", (S, A)),
    "referrals.amend": ("POST", "/referrals/{referral}/amend", (S, A)),
    "referrals.search": ("GET", "/referrals/search", (S, A)),
    "admin.users": ("GET", "/admin/users", (A,)),
    "admin.change_user": ("POST", "/admin/users/{user}", (A,)),
    "admin.tokens": ("GET", "/admin/tokens", (A,)),
    "admin.revoke_token": ("POST", "/admin/tokens/{token}/revoke", (A,)),
    "admin.issue_callback_secret": ("POST", "/admin/programs/{program}/callback-secret", (A,)),
    "admin.destinations": ("GET", "/admin/destinations", (A,)),
    "admin.toggle_destination": ("POST", "/admin/destinations/{destination}/enabled", (A,)),
    "admin.resend_study": ("POST", "/admin/studies/{study}/resend", (A,)),
    "admin.program_dicom_results": ("POST", "/admin/programs/{program}/dicom-results", (A,)),
    "admin.program_require_metadata": ("POST", "/admin/programs/{program}/require-metadata", (A,)),
    "admin.audit_log": ("GET", "/admin/audit", (A,)),
    "admin.audit_csv": ("GET", "/admin/audit.csv", (A,)),
    "admin.model": ("GET", "/admin/model", (A,)),
    "admin.program_prevalence": ("POST", "/admin/model/prevalence", (A,)),
    "admin.program_operating_point": ("GET", "/admin/programs/{program}/operating-point", (A,)),
    "admin.activate_bundle": ("POST", "/admin/model/bundles/{bundle}/activate", (A,)),
    "admin.bundle_state": ("POST", "/admin/model/bundles/{bundle}/shadow", (A,)),
    "admin.metrics": ("GET", "/admin/metrics", (A,)),
    "monitoring.page": ("GET", "/admin/monitoring/", (A,)),
    "monitoring.report": ("GET", "/admin/monitoring/report?month=2026-11", (A,)),
    "monitoring.prometheus": ("GET", "/admin/monitoring/metrics", (A,)),
    "api.list_batches": ("GET", "/api/v1/batches", TOKEN),
    "api.create_batch": ("POST", "/api/v1/batches", TOKEN),
    "api.get_batch": ("GET", "/api/v1/batches/{batch}", TOKEN),
    "api.batch_results": ("GET", "/api/v1/batches/{batch}/results", TOKEN),
    "api.export_batch": ("GET", "/api/v1/batches/{batch}/export", TOKEN),
    "api.get_study": ("GET", "/api/v1/studies/{study}", TOKEN),
    "api.study_fhir": ("GET", "/api/v1/studies/{study}/fhir", TOKEN),
    "api.get_lesion": ("GET", "/api/v1/lesions/{lesion}", TOKEN),
    "api.record_outcome": ("PUT", "/api/v1/studies/{study}/outcome", TOKEN),
    "api.import_outcomes": ("POST", "/api/v1/outcomes", TOKEN),
    "api.openapi": ("GET", "/api/v1/openapi.json", PUBLIC),
    "dicomweb.stow": ("POST", "/dicomweb/studies", TOKEN),
}


@pytest.fixture
def world(pg_settings, tiny_bundle, ham_dir, app_factory):
    """An app with one user per role, a scored and referred study, and a token."""
    from dermascan.intake.submission import submit
    from tests.helpers import ham_inputs

    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = get_or_create_program(session, "site-a")
        for role in ROLES[1:]:
            create_user(session, role, PASSWORD, role, program.id)
        _, plain = create_token(session, program.id, "bearer")
        token, _ = create_token(session, program.id, "to be revoked by the admin")
        bundle = bundles.register(session, tiny_bundle)
        from dermascan.results_out import destinations

        destination = destinations.add_destination(
            session, settings, program, "pacs", host="127.0.0.1", port=1, ae_title="PACS"
        )
        program_id, token_id, destination_id = program.id, token.id, destination.id
    inputs = ham_inputs(ham_dir, 1)
    inputs[0].lesion_id, inputs[0].patient_id = "lesion-1", "patient-1"
    result = submit(settings, program_id, inputs, source="test")
    study_id = result.accepted[0].study_id
    with factory() as session, session.begin():
        session.get(Study, study_id).status = StudyStatus.PROCESSING
        results.record(session, bundle.version, 0.0, [results.ScoredStudy(study_id, 0.9)])
        from sqlalchemy import select

        from dermascan.infra.schema import Referral

        referral_id = session.scalar(select(Referral.id))
        lesion_id = session.get(Study, study_id).lesion_id
        from dermascan.infra.schema import User

        user_id = session.scalar(select(User.id).where(User.username == "uploader"))
    ids = {
        "batch": result.batch_id, "study": study_id, "referral": referral_id, "token": token_id, "user": user_id,
        "program": program_id, "bundle": bundle.version, "destination": destination_id, "lesion": lesion_id,
    }  # fmt: skip
    return settings, ids, plain


def login(client, username):
    page = client.get("/login")
    match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text)
    reply = client.post(
        "/login", data={"username": username, "password": PASSWORD, "csrf_token": match.group(1) if match else ""}
    )
    assert reply.status_code == 302, reply.text


def test_every_route_for_every_role(world, app_factory):
    settings, ids, bearer = world
    app = app_factory(settings)
    app.config["WTF_CSRF_ENABLED"] = False  # CSRF has its own test below
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints == set(TABLE), (
        f"routes without an access rule: {endpoints - set(TABLE)}; stale rules: {set(TABLE) - endpoints}"
    )
    refusals = []
    for role in ROLES:
        client = app.test_client()
        if role != "anonymous":
            login(client, role)
        for endpoint, (method, template, allowed) in TABLE.items():
            if endpoint == "auth.logout":
                continue  # would end the session for the rest of the loop; covered by the browser test
            path = template.format(**ids)
            response = client.open(path, method=method, data={} if method == "POST" else None)
            status = response.status_code
            if allowed == PUBLIC:
                ok = status < 400 or (method == "POST" and status in (400, 401))
            elif allowed == TOKEN:
                ok = status == 401  # no role opens the API without a bearer token
                with_token = client.open(path, method=method, headers={"Authorization": f"Bearer {bearer}"})
                ok = ok and with_token.status_code not in (401, 403)
            elif role == "anonymous":
                ok = status == 302 and "/login" in response.headers["Location"]
            elif role in allowed:
                ok = status not in (401, 403) and status < 500
            else:
                ok = status == 403
            if not ok:
                refusals.append((role, endpoint, method, path, status))
    assert not refusals, refusals


def test_form_without_csrf_token_is_refused(world, app_factory):
    settings, ids, _ = world
    app = app_factory(settings)
    app.config["WTF_CSRF_ENABLED"] = True
    client = app.test_client()
    # the login form itself
    assert client.post("/login", data={"username": "admin", "password": PASSWORD}).status_code == 400
    login(client, "specialist")
    assert client.post("/referrals/claim", data={}).status_code == 400
    login_admin = app.test_client()
    login(login_admin, "admin")
    refused = login_admin.post(
        "/admin/users", data={"username": "mallory", "password": "x" * 12, "role": "admin", "program": "x"}
    )
    assert refused.status_code == 400
    with session_factory(settings.database_url)() as session:
        from sqlalchemy import select

        from dermascan.infra.schema import User

        assert session.scalar(select(User).where(User.username == "mallory")) is None


def test_login_rate_limit(world, app_factory):
    settings, _, _ = world
    app = app_factory(settings.replace(login_attempts_per_minute=3))
    client = app.test_client()
    page = client.get("/login")
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
    statuses = [
        client.post("/login", data={"username": "admin", "password": "wrong", "csrf_token": token}).status_code
        for _ in range(4)
    ]
    assert statuses == [401, 401, 401, 429]
    # even the right password is refused while throttled
    assert (
        client.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token}).status_code == 429
    )


def test_specialists_see_referred_cases_and_their_context_not_other_programs_batches(
    pg_settings, tiny_bundle, ham_dir, app_factory
):
    """The access-scope rule of docs/security.md: a specialist of another program (or of none)
    opens a referred case, its image and the same patient's other lesions, but not the batch, its
    results CSV or an unrelated study of that program — until an admin grants every program.
    An uploader without a program sees nothing (fail closed)."""
    from dermascan.intake.submission import submit
    from dermascan.security.accounts import change_user, get_user
    from tests.helpers import ham_inputs

    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        site_a, site_b = get_or_create_program(session, "site-a"), get_or_create_program(session, "site-b")
        create_user(session, "dr-b", PASSWORD, "specialist", site_b.id)
        create_user(session, "orphan", PASSWORD, "uploader", None)
        bundle = bundles.register(session, tiny_bundle)
        a_id = site_a.id
    inputs = ham_inputs(ham_dir, 3)
    inputs[0].patient_id = inputs[1].patient_id = "MRN-42"  # two lesions of one patient
    inputs[2].patient_id = "MRN-99"
    result = submit(settings, a_id, inputs, source="test")
    referred, context, unrelated = (a.study_id for a in result.accepted)
    with factory() as session, session.begin():
        for sid in (referred, context, unrelated):
            session.get(Study, sid).status = StudyStatus.PROCESSING
        results.record(
            session, bundle.version, 0.5,
            [results.ScoredStudy(referred, 0.9), results.ScoredStudy(context, 0.1), results.ScoredStudy(unrelated, 0.1)],
        )  # fmt: skip
        from dermascan.infra.schema import Referral

        referral_id = session.scalar(select(Referral.id).where(Referral.study_id == referred))
    app = app_factory(settings)
    client = app.test_client()
    login(client, "dr-b")
    assert client.get(f"/referrals/{referral_id}").status_code == 200
    assert client.get(f"/studies/{referred}/image").status_code == 200
    assert client.get(f"/studies/{context}/image").status_code == 200  # the patient's other lesion
    assert client.get(f"/studies/{unrelated}/image").status_code == 404
    batch_paths = [f"/batches/{result.batch_id}", f"/batches/{result.batch_id}/results.csv"]
    assert [client.get(p).status_code for p in batch_paths] == [404, 404]
    assert result.batch_id not in client.get("/batches").text
    with factory() as session, session.begin():
        change_user(session, get_user(session, "dr-b"), all_programs=True)
    login(client, "dr-b")  # the change ended the session
    assert [client.get(p).status_code for p in batch_paths] == [200, 200]
    assert client.get(f"/studies/{unrelated}/image").status_code == 200
    orphan = app.test_client()
    login(orphan, "orphan")
    assert result.batch_id not in orphan.get("/batches").text
    assert orphan.get(f"/studies/{referred}/image").status_code == 404
