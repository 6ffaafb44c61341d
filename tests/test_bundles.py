"""Activating a bundle is an admin act: a worker started with another bundle registers it but
takes no work (and changes nothing) until `dermascan bundle activate`, which is audited."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner
from sqlalchemy import select

from dermascan import bundles
from dermascan.cli import main
from dermascan.db import session_factory
from dermascan.schema import AuditEvent, ModelBundle, Prediction
from dermascan.submission import submit
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
