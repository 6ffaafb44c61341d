"""Admin: the operating point (threshold with its sensitivity/specificity), and the account CLI."""

from __future__ import annotations

import re

from click.testing import CliRunner
from sqlalchemy import select

from dermascan import bundles
from dermascan.accounts import authenticate, token_for
from dermascan.cli import main
from dermascan.db import session_factory
from dermascan.operating_point import at_threshold
from dermascan.schema import AuditEvent, ModelBundle, Prediction, User
from dermascan.screening import get_or_create_program, submit
from tests.helpers import ham_inputs

PASSWORD = "correct-horse-battery"


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def login(client, username):
    client.post(
        "/login", data={"username": username, "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)}
    )


def test_admin_moves_the_threshold_after_seeing_what_it_means(pg_settings, tiny_bundle, app_factory, ham_dir):
    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        from dermascan.accounts import create_user

        create_user(session, "chief", PASSWORD, "admin", get_or_create_program(session, "x").id)
        manifest = bundles.register(session, tiny_bundle).manifest
    client = app_factory(settings).test_client()
    login(client, "chief")
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
