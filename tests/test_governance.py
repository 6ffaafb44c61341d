"""Activating a bundle is an admin act: a worker started with another bundle registers it but
takes no work (and changes nothing) until `dermascan bundle activate`, which is audited."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import bundles
from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, ModelBundle, Prediction
from dermascan.intake.submission import submit
from tests.helpers import ham_inputs, program_id, status_counts
from tests.services import wait_for


def test_a_new_worker_bundle_decides_nothing_until_an_admin_activates_it(
    make_settings, pg_url, redis_url, tiny_bundle, start_worker, ham_dir, tmp_path
):
    second = tmp_path / "second-bundle"
    shutil.copytree(tiny_bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["version"] = "tiny-second"
    (second / "manifest.json").write_text(json.dumps(manifest))
    first_settings = make_settings(database_url=pg_url, broker_url=redis_url)
    with session_factory(pg_url)() as session, session.begin():
        first = bundles.register(session, tiny_bundle)  # the deployment's active bundle
    settings = first_settings.replace(model_bundle=second)
    submit(settings, program_id(settings), ham_inputs(ham_dir, 2), source="test")
    worker = start_worker(settings)
    wait_for(lambda: "not active" in worker.log(), 60, message="the worker's warning")
    with session_factory(pg_url)() as session:
        rows = {b.version: b.active for b in session.scalars(select(ModelBundle))}
    assert rows == {first.version: True, "tiny-second": False}
    assert status_counts(settings) == {"queued": 2}  # nothing claimed, nothing scored

    done = CliRunner().invoke(main, ["bundle", "activate", "tiny-second"], env=settings.as_env())
    assert done.exit_code == 0, done.output
    assert CliRunner().invoke(main, ["bundle", "activate", "no-such"], env=settings.as_env()).exit_code == 1
    wait_for(lambda: status_counts(settings).get("done") == 2, 180, message="scored after activation")
    with session_factory(pg_url)() as session:
        assert {p.bundle_version for p in session.scalars(select(Prediction))} == {"tiny-second"}
        event = session.scalar(
            select(AuditEvent).where(AuditEvent.action == "bundle_activated", AuditEvent.object_id == "tiny-second")
        )
        assert event.detail["previous"] == first.version
    listed = CliRunner().invoke(main, ["bundle", "list"], env=settings.as_env()).output
    assert "* tiny-second" in listed


def test_a_shadow_bundle_scores_the_same_studies_in_the_same_batch_and_decides_nothing(
    pg_settings, start_worker, ham_dir
):
    """Issue 15, item 1: the tiny bundle decides, the default bundle runs in shadow. Every study
    gets both predictions, only the active one's makes referrals and results; retiring stops the
    shadow, activation is atomic; every change audited."""
    from dermascan.infra.schema import Referral, Study
    from dermascan.screening.reports import study_result
    from model.bundle import read_manifest
    from tests.services import ROOT

    settings = pg_settings
    default = read_manifest(ROOT / "model" / "bundles" / "default", verify=False)["version"]
    env = settings.as_env()
    cli = CliRunner()
    worker = start_worker(settings)
    wait_for(lambda: bundles_in(settings).get("tiny-test") == "active", 60, message="the tiny bundle active")
    for args in (["bundle", "register", str(ROOT / "model" / "bundles" / "default")], ["bundle", "shadow", default]):
        done = cli.invoke(main, args, env=env)
        assert done.exit_code == 0, done.output
    assert bundles_in(settings) == {"tiny-test": "active", default: "shadow"}
    refused = cli.invoke(main, ["bundle", "retire", "tiny-test"], env=env)
    assert refused.exit_code != 0 and "active bundle" in refused.output
    # the shadow would refer everything, the active bundle nothing it can assess: only its decision counts
    with session_factory(settings.database_url)() as session, session.begin():
        session.get(ModelBundle, default).threshold = 0.0
        session.get(ModelBundle, "tiny-test").threshold = 1.0

    first = submit(settings, program_id(settings), ham_inputs(ham_dir, 6), source="test")
    wait_for(lambda: status_counts(settings, first.batch_id).get("done") == 6, 240, message="scored")
    with session_factory(settings.database_url)() as session:
        predictions = list(session.scalars(select(Prediction)))
        by_study: dict[int, dict[str, Prediction]] = {}
        for p in predictions:
            by_study.setdefault(p.study_id, {})[p.bundle_version] = p
        assert len(by_study) == 6 and all(set(v) == {"tiny-test", default} for v in by_study.values())
        assert all(v[default].shadow and not v["tiny-test"].shadow for v in by_study.values())
        for referral in session.scalars(select(Referral)):
            assert referral.category == "not_assessable"  # never the shadow's high-risk call
            assert session.get(Prediction, referral.prediction_id).bundle_version == "tiny-test"
        for study in session.scalars(select(Study)):
            result = study_result(session, study)
            assert result["bundle_version"] == "tiny-test"  # results say which bundle decided
            if result["assessable"]:
                assert result["probability"] == round(by_study[study.id]["tiny-test"].probability, 6)
    assert "loaded shadow bundle " + default in worker.log()

    done = cli.invoke(main, ["bundle", "retire", default], env=env)
    assert done.exit_code == 0 and bundles_in(settings)[default] == "retired"
    second = submit(settings, program_id(settings), ham_inputs(ham_dir, 2, offset=6), source="test")
    wait_for(lambda: status_counts(settings, second.batch_id).get("done") == 2, 120, message="scored after retiring")
    with session_factory(settings.database_url)() as session:
        versions = session.scalars(
            select(Prediction.bundle_version).join(Study).where(Study.batch_id == second.batch_id)
        ).all()
    assert sorted(versions) == ["tiny-test", "tiny-test"]

    done = cli.invoke(main, ["bundle", "activate", default], env=env)
    assert done.exit_code == 0 and bundles_in(settings) == {"tiny-test": "registered", default: "active"}
    with session_factory(settings.database_url)() as session:
        actions = [
            (e.action, e.object_id)
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.object_type == "bundle").order_by(AuditEvent.id)
            )
        ]
    assert actions[-3:] == [("bundle_shadowed", default), ("bundle_retired", default), ("bundle_activated", default)]


def bundles_in(settings) -> dict[str, str]:
    with session_factory(settings.database_url)() as session:
        return {b.version: b.state for b in session.scalars(select(ModelBundle))}
