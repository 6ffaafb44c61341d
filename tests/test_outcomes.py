"""Recorded outcomes (issue 15, item 2): histopathology or not biopsied, per study — by the API,
a CSV import (bad rows reported, nothing half-imported), the case page and the CLI; audited."""

from __future__ import annotations

import re

from click.testing import CliRunner
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import bundles
from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, Outcome, OutcomeKind, Referral, Study, StudyStatus
from dermascan.intake.submission import submit
from dermascan.screening import results
from dermascan.security.accounts import create_user
from tests.helpers import ham_inputs
from tests.test_security import PASSWORD, _login


def _studies(settings, program_id, ham_dir, n):
    result = submit(settings, program_id, ham_inputs(ham_dir, n), source="test")
    return [a.study_id for a in result.accepted]


def outcomes_of(settings) -> dict:
    with session_factory(settings.database_url)() as session:
        return {
            o.study_id: (OutcomeKind(o.kind).value, o.diagnosis, o.source) for o in session.scalars(select(Outcome))
        }


def test_outcomes_by_api_and_csv_all_or_nothing(pg_settings, app_factory, api_token, ham_dir):
    settings = pg_settings
    program_id, token = api_token("outcomes")
    _, other_token = api_token("another-program")
    ids = _studies(settings, program_id, ham_dir, 3)
    client = app_factory(settings).test_client()
    headers = {"Authorization": f"Bearer {token}"}

    reply = client.put(
        f"/api/v1/studies/{ids[0]}/outcome", headers=headers, json={"outcome": "malignant", "diagnosis": "melanoma"}
    )
    assert reply.status_code == 200 and reply.json["outcome"] == "malignant"
    assert (
        client.put(f"/api/v1/studies/{ids[0]}/outcome", headers=headers, json={"outcome": "maybe"}).status_code == 400
    )
    bad = client.put(
        f"/api/v1/studies/{ids[1]}/outcome", headers=headers, json={"outcome": "not_biopsied", "diagnosis": "nevus"}
    )
    assert bad.status_code == 400 and "not biopsied" in bad.json["error"]
    other = {"Authorization": f"Bearer {other_token}"}
    assert client.put(f"/api/v1/studies/{ids[0]}/outcome", headers=other, json={"outcome": "benign"}).status_code == 404

    # a CSV with one bad row among good ones: every bad row reported, nothing imported
    csv_text = (
        "study_id,outcome,diagnosis\n"
        f"{ids[1]},benign,seborrhoeic keratosis\n"
        f"{ids[2]},biopsy pending,\n"
        "999999,benign,\n"
        f"{ids[1]},malignant,melanoma\n"
    )
    reply = client.post("/api/v1/outcomes", headers={**headers, "Content-Type": "text/csv"}, data=csv_text)
    assert reply.status_code == 400
    assert [(r["line"], r["study_id"]) for r in reply.json["rows"]] == [
        (3, str(ids[2])),
        (4, "999999"),
        (5, str(ids[1])),
    ]
    assert set(outcomes_of(settings)) == {ids[0]}  # only the one recorded by PUT
    good = f"study_id,outcome,diagnosis\n{ids[1]},benign,seborrhoeic keratosis\n{ids[2]},not biopsied,\n{ids[0]},benign,nevus\n"
    reply = client.post("/api/v1/outcomes", headers={**headers, "Content-Type": "text/csv"}, data=good)
    assert reply.status_code == 200 and reply.json == {"imported": 3}
    assert outcomes_of(settings) == {
        ids[0]: ("benign", "nevus", "api"),  # replaced; the audit keeps what it replaced
        ids[1]: ("benign", "seborrhoeic keratosis", "api"),
        ids[2]: ("not_biopsied", None, "api"),
    }
    with session_factory(settings.database_url)() as session:
        events = list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.action == "outcome_recorded", AuditEvent.object_id == str(ids[0]))
                .order_by(AuditEvent.id)
            )
        )
        assert [e.detail["outcome"] for e in events] == ["malignant", "benign"]
        assert events[1].detail["replaced"] == {"outcome": "malignant", "diagnosis": "melanoma"}


def test_outcome_on_the_case_page_and_from_the_cli(pg_settings, tiny_bundle, app_factory, ham_dir, tmp_path):
    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        from dermascan.security.identity import get_or_create_program

        program_id = get_or_create_program(session, "clinic").id
        create_user(session, "dr-outcome", PASSWORD, "specialist", program_id)
        bundle = bundles.register(session, tiny_bundle)
    ids = _studies(settings, program_id, ham_dir, 2)
    with factory() as session, session.begin():
        for sid in ids:
            session.get(Study, sid).status = StudyStatus.PROCESSING
        results.record(
            session, bundle.version, 0.5, [results.ScoredStudy(ids[0], 0.9), results.ScoredStudy(ids[1], 0.1)]
        )
        referral_id = session.scalar(select(Referral.id).where(Referral.study_id == ids[0]))
    client = app_factory(settings).test_client()
    assert _login(client, "dr-outcome", PASSWORD).status_code == 302
    assert 'id="program-probability"' not in client.get(f"/referrals/{referral_id}").text  # no prevalence set
    with factory() as session, session.begin():
        from dermascan.infra.schema import Program
        from dermascan.screening.reports import study_result

        session.get(Program, program_id).expected_prevalence = 0.02
        expected = study_result(session, session.get(Study, ids[0]))["probability_at_program_prevalence"]
    page = client.get(f"/referrals/{referral_id}")
    # the case page shows the same re-weighed probability as the exports
    assert f'<strong id="program-probability">{expected:.3f}</strong>' in page.text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
    reply = client.post(
        f"/referrals/{referral_id}/outcome",
        data={"csrf_token": token, "outcome": "malignant", "diagnosis": "mel"},
    )
    assert reply.status_code == 302
    assert "— Melanoma" in client.get(f"/referrals/{referral_id}").text
    # the CLI imports the non-referred study's outcome; a bad file changes nothing and says why
    bad = tmp_path / "bad.csv"
    bad.write_text(f"study_id,outcome\n{ids[1]},unknown\n")
    done = CliRunner().invoke(main, ["outcomes", "import", str(bad)], env=settings.as_env())
    assert done.exit_code == 1 and "line 2" in done.output
    good = tmp_path / "good.csv"
    good.write_text(f"study_id,outcome,diagnosis\n{ids[1]},benign,dermatofibroma\n")
    done = CliRunner().invoke(main, ["outcomes", "import", str(good), "--program", "clinic"], env=settings.as_env())
    assert done.exit_code == 0, done.output
    assert outcomes_of(settings) == {
        ids[0]: ("malignant", "mel", "portal"),
        ids[1]: ("benign", "dermatofibroma", "csv"),
    }
