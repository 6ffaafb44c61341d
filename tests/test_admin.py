"""Admin: the operating point (threshold with its sensitivity/specificity), and the account CLI."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import bundles
from dermascan.governance.operating_point import at_threshold
from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, ModelBundle, Prediction, User
from dermascan.intake.submission import submit
from dermascan.security.accounts import authenticate, token_for
from dermascan.security.identity import get_or_create_program
from tests.helpers import ham_inputs

PASSWORD = "correct-horse-battery"


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def login(client, username):
    client.post(
        "/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)}
    )


def admin_with_bundle(settings, tiny_bundle, app_factory):
    """A logged-in admin's client, with the tiny bundle registered; and the bundle's manifest."""
    from dermascan.security.accounts import create_user

    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "chief", PASSWORD, "admin", get_or_create_program(session, "x").id)
        manifest = bundles.register(session, tiny_bundle).manifest
    client = app_factory(settings).test_client()
    login(client, "chief")
    return client, manifest


def test_admin_moves_the_threshold_after_seeing_what_it_means(pg_settings, tiny_bundle, app_factory, ham_dir):
    settings = pg_settings
    factory = session_factory(settings.database_url)
    client, manifest = admin_with_bundle(settings, tiny_bundle, app_factory)
    page = client.get("/admin/model").text
    assert "current threshold" in page and "sensitivity" in page

    expected = at_threshold(manifest, 0.3)
    preview = client.post("/admin/model", data={"threshold": "0.3", "csrf_token": csrf(page)})
    assert preview.status_code == 200
    assert f"sensitivity <strong>{expected['sensitivity']:.3f}</strong>" in preview.text
    assert f"specificity <strong>{expected['specificity']:.3f}</strong>" in preview.text
    with factory() as session:
        assert session.get(ModelBundle, "tiny-test").threshold == manifest["threshold"]  # not saved yet

    saved = client.post("/admin/model", data={"threshold": "0.3", "confirm": "y", "csrf_token": csrf(preview.text)})
    assert saved.status_code == 302
    with factory() as session:
        assert session.get(ModelBundle, "tiny-test").threshold == 0.3
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "threshold_changed"))
        assert event.detail["to"] == 0.3 and event.detail["at_validation"]["sensitivity"] == expected["sensitivity"]
    # studies scored from now on use it
    from worker.scoring import ScoreStudies

    result = submit(settings, get_or_create_program_id(settings), ham_inputs(ham_dir, 2), source="test")
    ScoreStudies(settings, result.new_study_ids).run()
    with factory() as session:
        assert {p.threshold for p in session.scalars(select(Prediction))} == {0.3}
    # out-of-range values are refused
    refused = client.post(
        "/admin/model", data={"threshold": "1.5", "confirm": "y", "csrf_token": csrf(client.get("/admin/model").text)}
    )
    assert refused.status_code == 400 and "Number must be between" in refused.text


def test_operating_point_page_draws_the_roc_and_expected_referrals_at_a_programs_prevalence(
    pg_settings, tiny_bundle, app_factory, ham_dir
):
    from dermascan.governance import operating_point
    from dermascan.infra.schema import Program, Study
    from dermascan.screening import reports
    from model.inference import calibration
    from worker.scoring import ScoreStudies

    settings = pg_settings
    factory = session_factory(settings.database_url)
    client, manifest = admin_with_bundle(settings, tiny_bundle, app_factory)
    page = client.get("/admin/model").text
    assert 'id="roc-curve"' in page and 'id="roc-current"' in page
    current = at_threshold(manifest, manifest["threshold"])
    own = manifest["calibration"]["prevalence"]
    per_1000 = operating_point.referrals_per_1000(current, own)
    assert f"<td>{per_1000:.0f}</td>" in page
    # an admin sets program x's expected prevalence to 2 %: audited, shown with its own referral count
    saved = client.post(
        "/admin/model/prevalence", data={"program": get_or_create_program_id(settings), "prevalence": "2", "csrf_token": csrf(page)}
    )  # fmt: skip
    assert saved.status_code == 302
    page = client.get("/admin/model").text
    assert f"<td>{operating_point.referrals_per_1000(current, 0.02):.0f}</td>" in page and "2.00 %" in page
    bad = client.post(
        "/admin/model/prevalence",
        data={"program": get_or_create_program_id(settings), "prevalence": "80", "csrf_token": csrf(page)},
    )
    assert bad.status_code == 400
    # results show the probability re-weighed to it; the referral decision does not move
    result = submit(settings, get_or_create_program_id(settings), ham_inputs(ham_dir, 3), source="test")
    ScoreStudies(settings, result.new_study_ids).run()
    with factory() as session:
        assert session.scalar(select(Program).where(Program.name == "x")).expected_prevalence == 0.02
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "program_prevalence_set"))
        assert event.detail == {"program": "x", "from": None, "to": 0.02}
        for study in session.scalars(select(Study)):
            row = reports.study_result(session, study)
            shifted = calibration.at_prevalence(row["probability"], own, 0.02)
            assert row["probability_at_program_prevalence"] == pytest.approx(shifted, abs=1e-6)
            assert row["probability_at_program_prevalence"] <= row["probability"]
            assert row["referred"] == (row["probability"] >= row["threshold"])
    # and from the command line
    runner = CliRunner(env=settings.as_env())
    assert runner.invoke(main, ["program", "prevalence", "x", "--clear"]).exit_code == 0
    refused = runner.invoke(main, ["program", "prevalence", "x", "0.7"])
    assert refused.exit_code != 0 and "(0, 0.5]" in refused.output
    with factory() as session:
        assert session.scalar(select(Program).where(Program.name == "x")).expected_prevalence is None


def get_or_create_program_id(settings) -> int:
    with session_factory(settings.database_url)() as session, session.begin():
        return get_or_create_program(session, "x").id


def test_user_add_and_token_create_commands(pg_settings):
    env = settings_env = pg_settings.as_env()
    runner = CliRunner(env=env)
    done = runner.invoke(
        main, ["user", "add", "dr-who", "--role", "specialist", "--program", "clinic", "--password", PASSWORD]
    )
    assert done.exit_code == 0, done.output
    again = runner.invoke(main, ["user", "add", "dr-who", "--role", "admin", "--password", PASSWORD])
    assert again.exit_code != 0 and "already exists" in again.output
    short = runner.invoke(main, ["user", "add", "x", "--role", "admin", "--password", "short"])
    assert short.exit_code != 0 and "at least 10 characters" in short.output
    token = runner.invoke(main, ["token", "create", "nightly", "--program", "telederm"])
    assert token.exit_code == 0
    with session_factory(settings_env["DERMASCAN_DATABASE_URL"])() as session:
        user = authenticate(session, "dr-who", PASSWORD)
        assert user is not None and user.role.value == "specialist" and user.program.name == "clinic"
        assert session.scalar(select(User).where(User.username == "x")) is None
        assert token_for(session, token.output.strip()).program.name == "telederm"


def test_admin_configures_dicom_destinations_on_the_page_and_the_cli(pg_settings, tiny_bundle, app_factory):
    """Issue 13, item 3: DIMSE and STOW-RS destinations from the admin page (the secret kept
    encrypted, bad entries refused with a reason, nothing half-saved), disabled and listed by
    the CLI; every change audited."""
    from dermascan.infra.schema import DicomDestination

    settings = pg_settings
    factory = session_factory(settings.database_url)
    client, _ = admin_with_bundle(settings, tiny_bundle, app_factory)
    page = client.get("/admin/destinations").text
    assert "No destinations yet" in page
    form = {"csrf_token": csrf(page), "program": "hospital-b"}
    added = client.post("/admin/destinations", data={**form, "name": "pacs", "kind": "dimse", "host": "10.1.2.3",
                                                     "port": "11112", "ae_title": "PACS_MAIN"}, follow_redirects=True)  # fmt: skip
    assert "Destination pacs added: PACS_MAIN@10.1.2.3:11112." in added.text
    added = client.post("/admin/destinations", data={**form, "name": "vna", "kind": "stow", "url": "https://vna.example/dicom-web",
                                                     "username": "dermascan", "secret": "s3cret-vna-pass"}, follow_redirects=True)  # fmt: skip
    assert "Destination vna added: https://vna.example/dicom-web." in added.text
    for bad, reason in [
        ({"name": "x", "kind": "dimse", "host": "h", "port": "104", "ae_title": "A\\B"}, "AE title"),
        ({"name": "y", "kind": "stow", "url": "ftp://vna.example/"}, "http(s) URL"),
        (
            {"name": "pacs", "kind": "dimse", "host": "h", "port": "104", "ae_title": "PACS"},
            "already has a destination",
        ),
        ({"name": "z", "kind": "dimse", "host": "h", "ae_title": "PACS"}, "port"),
    ]:
        answer = client.post("/admin/destinations", data={**form, **bad})
        assert reason in answer.text, (bad, answer.text[-2000:])
    with factory() as session:
        rows = {d.name: d for d in session.scalars(select(DicomDestination))}
        assert set(rows) == {"pacs", "vna"}
        assert rows["vna"].secret_encrypted and b"s3cret-vna-pass" not in rows["vna"].secret_encrypted
        pacs_id = rows["pacs"].id
    token = csrf(client.get("/admin/destinations").text)
    client.post(f"/admin/destinations/{pacs_id}/enabled", data={"csrf_token": token})
    with factory() as session:
        program_id = get_or_create_program(session, "hospital-b").id
    client.post(f"/admin/programs/{program_id}/dicom-results", data={"csrf_token": token})
    assert "<td>every study</td>" in client.get("/admin/destinations").text
    listed = CliRunner().invoke(main, ["destination", "list"], env=settings.as_env())
    assert listed.exit_code == 0, listed.output
    assert "hospital-b\tpacs\tdimse\tPACS_MAIN@10.1.2.3:11112\tdisabled\tnothing sent yet" in listed.output
    added = CliRunner().invoke(
        main,
        ["destination", "add", "hospital-b", "pacs2", "--dimse", "10.1.2.4:104", "--ae", "PACS2"],
        env=settings.as_env(),
    )
    assert added.exit_code == 0, added.output
    refused = CliRunner().invoke(
        main, ["destination", "add", "hospital-b", "pacs3", "--dimse", "nohostport"], env=settings.as_env()
    )
    assert refused.exit_code != 0 and "HOST:PORT" in refused.output
    with factory() as session:
        actions = [e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.object_type == "destination"))]
    assert actions.count("destination_added") == 3 and "destination_disabled" in actions
    with factory() as session:
        assert session.scalar(select(AuditEvent.detail).where(AuditEvent.action == "program_dicom_results")) == {
            "all_studies": True
        }


def test_admin_puts_a_bundle_in_shadow_and_retires_it_on_the_model_page(
    pg_settings, tiny_bundle, app_factory, tmp_path
):
    import json
    import shutil

    settings = pg_settings
    client, _ = admin_with_bundle(settings, tiny_bundle, app_factory)
    second = tmp_path / "second"
    shutil.copytree(tiny_bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["version"] = "tiny-candidate"
    (second / "manifest.json").write_text(json.dumps(manifest))
    with session_factory(settings.database_url)() as session, session.begin():
        bundles.register(session, second, activate=False)
    page = client.get("/admin/model").text
    assert "Shadow tiny-candidate" in page
    token = csrf(page)
    client.post("/admin/model/bundles/tiny-candidate/shadow", data={"csrf_token": token})
    refused = client.post("/admin/model/bundles/tiny-test/retire", data={"csrf_token": token}, follow_redirects=True)
    assert "is the active bundle" in refused.text
    with session_factory(settings.database_url)() as session:
        assert {b.version: b.state for b in session.scalars(select(ModelBundle))} == {
            "tiny-test": "active",
            "tiny-candidate": "shadow",
        }
    client.post("/admin/model/bundles/tiny-candidate/retire", data={"csrf_token": token})
    with session_factory(settings.database_url)() as session:
        assert session.get(ModelBundle, "tiny-candidate").state == "retired"
        assert [
            e.action for e in session.scalars(select(AuditEvent).where(AuditEvent.object_id == "tiny-candidate"))
        ] == ["bundle_shadowed", "bundle_retired"]
