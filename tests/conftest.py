"""Settings and tokens shared by the tests; the fixtures of each part (databases, broker, model,
processes) live in ``tests/fixtures/`` and the plain code they start in ``tests/services.py``."""

from __future__ import annotations

import uuid

import pytest

from dermascan.config import Settings

pytest_plugins = [
    "tests.fixtures.databases",
    "tests.fixtures.broker",
    "tests.fixtures.model",
    "tests.fixtures.processes",
    "tests.fixtures.browser",
]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (``item.report_call``…), so a fixture's teardown can
    tell whether its test failed (the worker fixture then attaches its processes' logs)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    """The fast tier's settings: the embedded default (SQLite, the filesystem queue) in a temporary
    folder, migrated, with the bundled default model named but never loaded — nothing to train,
    nothing running (`pytest -m "not slow"`)."""
    from dermascan.infra import migrate

    settings = Settings.from_env(env={}, data_dir=tmp_path / "var", secret_key="fast-tier-secret")
    migrate.upgrade(settings.database_url)
    return settings


@pytest.fixture
def make_settings(tmp_path, tiny_bundle):
    """Settings with the tiny trained bundle (slow: it trains once per session) — for tests that
    score with a worker or a predictor."""

    def make(**overrides) -> Settings:
        values = dict(
            data_dir=tmp_path / "data",
            model_bundle=tiny_bundle,
            secret_key="test-secret-" + uuid.uuid4().hex,
            sweep_queued_after_s=600,
            sweep_processing_after_s=600,
            sweep_interval_s=2,
            visibility_timeout_s=3600,
            bulk_chunk_size=8,
            predict_batch_sizes=(1, 8),
            tta=False,
            # the tiny bundles have no shipped ONNX package: Keras (the ONNX path is tested with the
            # bundled default, test_follow_up.py and the demo)
            runtime="keras",
            # the tests' own PACS (Orthanc) listens on this machine: an operator's exception
            destination_allow_hosts="127.0.0.1,localhost",
        )
        values.update(overrides)
        return Settings.from_env(env={}, **values)

    return make


@pytest.fixture
def pg_settings(make_settings, pg_url, redis_url) -> Settings:
    return make_settings(database_url=pg_url, broker_url=redis_url)


@pytest.fixture
def api_token(pg_settings):
    """A bearer token for program 'telederm-a' → (program_id, token)."""
    from dermascan.infra.db import session_factory
    from dermascan.security.accounts import create_token
    from dermascan.security.identity import get_or_create_program

    def make(program: str = "telederm-a"):
        with session_factory(pg_settings.database_url)() as session, session.begin():
            pid = get_or_create_program(session, program).id
            _, plain = create_token(session, pid, f"{program} nightly")
        return pid, plain

    return make


# the fast tier (`pytest -m "not slow"`): whatever needs PostgreSQL, Redis, a trained model or a
# process of its own is slow, marked here from the fixtures it asks for so no test can forget
# (``trained_bundle``: test_model.py trains a pipeline of its own, tens of seconds)
SLOW_FIXTURES = {
    "pg_server_url", "pg_url", "redis_url", "private_redis", "tiny_bundle", "trained_bundle", "start_worker",
    "live_server",
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
