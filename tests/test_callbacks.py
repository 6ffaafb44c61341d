"""results_out/callbacks: batch completion callbacks — an HMAC-signed POST with each program's own
rotatable secret, retried with backoff until it is accepted, on a queue of their own, and never
turned against the network (no loopback, private or metadata address, checked again at connect
time; no redirect followed)."""

from __future__ import annotations

import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from sqlalchemy import select

from dermascan.infra import broker
from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, Program
from dermascan.results_out import callbacks
from dermascan.security import keys
from dermascan.security.accounts import create_user, issue_callback_secret
from dermascan.security.identity import get_or_create_program
from tests.ham_files import ham_zip
from tests.services import wait_for
from tests.test_security import PASSWORD, _login


class Receiver:
    def __init__(self, fail_first: int):
        self.calls: list[tuple[int, dict, bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(receiver.calls) < receiver.fail_first else 204
                receiver.calls.append((status, self.headers, body))  # case-insensitive lookup
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/dermascan"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_completion_callback_is_signed_and_retried(pg_settings, live_server, start_worker, api_token, ham_dir):
    settings = pg_settings.replace(callback_allow_hosts="127.0.0.1")  # the test's receiver is on loopback
    server = live_server(settings)
    program_id, token = api_token()
    with session_factory(settings.database_url)() as session, session.begin():
        secret = issue_callback_secret(session, session.get(Program, program_id), settings.secret_key)
    receiver = Receiver(fail_first=1)
    archive, _ = ham_zip(ham_dir, 5)
    reply = requests.post(
        f"{server.url}/api/v1/batches",
        headers={"Authorization": f"Bearer {token}"},
        files={"archive": ("a.zip", archive)},
        data={"callback_url": receiver.url},
        timeout=60,
    )
    assert reply.status_code == 201, reply.text
    batch_id = reply.json()["batch_id"]
    start_worker(settings)
    wait_for(lambda: any(status == 204 for status, _, _ in receiver.calls), 120, message="the callback delivered")
    assert [status for status, _, _ in receiver.calls] == [500, 204]  # failed once, retried after a backoff
    _, headers, body = receiver.calls[-1]
    assert callbacks.verify(secret, body, headers[callbacks.SIGNATURE_HEADER])  # the program's own secret
    assert not callbacks.verify(settings.secret_key, body, headers[callbacks.SIGNATURE_HEADER])
    event = json.loads(body)
    assert event["event"] == "batch.completed" and event["batch_id"] == batch_id
    assert event["counts"] == {"done": 5}
    receiver.server.shutdown()


def test_a_decision_goes_back_to_the_sender(pg_settings, live_server, start_worker, api_token, ham_dir, app_factory):
    """A specialist decides a study of an API batch: the sender's callback URL gets a signed
    study.decided event, and the study's result (REST JSON, CSV) carries the decision."""
    import re

    from dermascan.infra.schema import Referral, Study

    settings = pg_settings.replace(callback_allow_hosts="127.0.0.1")
    server = live_server(settings)
    program_id, token = api_token()
    with session_factory(settings.database_url)() as session, session.begin():
        secret = issue_callback_secret(session, session.get(Program, program_id), settings.secret_key)
        create_user(session, "dr.who", PASSWORD, "specialist", program_id)
    receiver = Receiver(fail_first=0)
    archive, _ = ham_zip(ham_dir, 12)
    auth = {"Authorization": f"Bearer {token}"}
    reply = requests.post(f"{server.url}/api/v1/batches", headers=auth, files={"archive": ("a.zip", archive)},
                          data={"callback_url": receiver.url}, timeout=60)  # fmt: skip
    assert reply.status_code == 201, reply.text
    start_worker(settings)
    wait_for(lambda: receiver.calls, 120, message="the batch's callback")
    with session_factory(settings.database_url)() as session:
        referral_id, study_id, reference = session.execute(
            select(Referral.id, Study.id, Study.external_id).join(Study, Study.id == Referral.study_id)
            .where(Referral.category != "not_assessable").order_by(Referral.id).limit(1)
        ).one()  # fmt: skip
    portal = app_factory(settings).test_client()
    assert _login(portal, "dr.who", PASSWORD).status_code == 302
    csrf = lambda html: re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)  # noqa: E731
    page = portal.get(f"/referrals/{referral_id}").text
    assert 'id="claim-this"' in page  # opened from a link: this very case can be claimed
    assert portal.post(f"/referrals/{referral_id}/claim", data={"csrf_token": csrf(page)}).status_code == 302
    page = portal.get(f"/referrals/{referral_id}").text
    answer = portal.post(f"/referrals/{referral_id}/decide", data={
        "decision": "biopsy_or_excision", "diagnosis": "mel", "note": "Atypical network.", "csrf_token": csrf(page)})  # fmt: skip
    assert answer.status_code == 302, answer.text
    wait_for(lambda: len(receiver.calls) >= 2, 60, message="the decision's callback")
    _, headers, body = receiver.calls[-1]
    assert callbacks.verify(secret, body, headers[callbacks.SIGNATURE_HEADER])
    event = json.loads(body)
    assert event["event"] == "study.decided" and event["study_id"] == study_id and event["external_id"] == reference
    assert (
        (event["decision"], event["decision_label"], event["specialist_diagnosis"])
        == ("biopsy_or_excision", "Biopsy or excision", "mel")
        and event["decided_at"]
        and "note" not in event
    )  # the note stays in DermaScan
    shown = requests.get(f"{server.url}/api/v1/studies/{study_id}", headers=auth, timeout=30).json()
    assert (shown["decision"], shown["specialist_diagnosis"], shown["referral_id"]) == (
        "biopsy_or_excision",
        "mel",
        referral_id,
    )
    with session_factory(settings.database_url)() as session:
        assert session.get(Referral, referral_id).callback_status == "sent (attempt 1)"
    receiver.server.shutdown()


def test_callback_url_must_be_http(pg_settings, live_server, api_token, ham_dir):
    server = live_server(pg_settings)
    _, token = api_token()
    archive, _ = ham_zip(ham_dir, 1)
    reply = requests.post(f"{server.url}/api/v1/batches", headers={"Authorization": f"Bearer {token}"},
                          files={"archive": ("a.zip", archive)}, data={"callback_url": "file:///etc/passwd"}, timeout=60)  # fmt: skip
    assert reply.status_code == 400 and "callback_url" in reply.json()["error"]


def test_each_program_signs_with_its_own_rotatable_secret(pg_settings, app_factory):
    with session_factory(pg_settings.database_url)() as session, session.begin():
        a, b = get_or_create_program(session, "prog-a"), get_or_create_program(session, "prog-b")
        create_user(session, "keeper", PASSWORD, "admin", a.id)
        first_a, first_b = (
            issue_callback_secret(session, a, pg_settings.secret_key),
            issue_callback_secret(session, b, pg_settings.secret_key),
        )
        a_id = a.id
    assert first_a != first_b and first_a.startswith("whsec_")
    body = b'{"event": "batch.completed"}'
    header = callbacks.sign(first_a, body)
    assert callbacks.verify(first_a, body, header)
    assert not callbacks.verify(first_b, body, header)
    assert not callbacks.verify(pg_settings.secret_key, body, header)
    # the admin rotates prog-a's secret on the tokens page: shown once, the old one stops signing
    client = app_factory(pg_settings).test_client()
    assert _login(client, "keeper", PASSWORD).status_code == 302
    page = client.get("/admin/tokens")
    token = page.text.split('name="csrf_token" type="hidden" value="')[1].split('"')[0]
    reply = client.post(f"/admin/programs/{a_id}/callback-secret", data={"csrf_token": token})
    assert reply.status_code == 200
    second = reply.text.split('id="new-callback-secret">')[1].split("<")[0]
    assert second not in (first_a, first_b) and reply.text.count(second) == 1
    assert "<title>API tokens · DermaScan</title>" in reply.text
    assert second not in client.get("/admin/tokens").text  # not shown again
    with session_factory(pg_settings.database_url)() as session:
        generation = session.get(Program, a_id).callback_secret_generation
        assert session.scalar(select(AuditEvent).where(AuditEvent.action == "callback_secret_issued"))
    assert keys.callback_secret(pg_settings.secret_key, a_id, generation) == second


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/x",
        "https://10.0.0.5/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://169.254.169.254/",
        "http://ehr.example.org/hook",  # http to a host nobody listed
        "https://user:pw@ehr.example.org/hook",
        "file:///etc/passwd",
        "gopher://ehr.example.org/",
    ],
)
def test_callback_urls_that_could_reach_the_inside_are_refused(pg_settings, url):
    with pytest.raises(callbacks.CallbackRefused):
        callbacks.check_url(pg_settings, url)


def test_callback_urls_are_refused_by_the_api(pg_settings, app_factory, api_token, ham_dir):
    from tests.ham_files import ham_zip

    program_id, token = api_token("ssrf")
    client = app_factory(pg_settings).test_client()
    archive, _ = ham_zip(ham_dir, 1)
    headers = {"Authorization": f"Bearer {token}"}
    for url in ("http://169.254.169.254/latest/meta-data/", "https://hooks.example.org/dermascan"):
        reply = client.post(
            "/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(archive), "a.zip"), "callback_url": url}
        )
        assert reply.status_code == 400 and "callback" in reply.json["error"], reply.json
    # the second was refused only for want of a secret: with one issued it is accepted
    with session_factory(pg_settings.database_url)() as session, session.begin():
        issue_callback_secret(session, session.get(Program, program_id), pg_settings.secret_key)
    reply = client.post(
        "/api/v1/batches",
        headers=headers,
        data={"archive": (io.BytesIO(archive), "a.zip"), "callback_url": "https://hooks.example.org/dermascan"},
    )
    assert reply.status_code == 201, reply.json


class Hook:
    def __init__(self, status: int = 204, location: str | None = None):
        self.calls = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                hook.calls.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_addresses_are_checked_at_connect_time_and_redirects_are_not_followed(pg_settings):
    target = Hook()
    # "localhost" passes the URL check (a name), but resolves to loopback: refused when connecting
    listed_by_ip = pg_settings.replace(callback_allow_hosts="")
    with pytest.raises(callbacks.CallbackRefused, match="loopback"):
        callbacks.post(listed_by_ip, f"https://localhost:{target.port}/hook", b"{}", {})
    assert target.calls == []
    # an admin-listed host is reached; its redirect to another inside address is not followed
    allowed = pg_settings.replace(callback_allow_hosts="127.0.0.1")
    assert callbacks.post(allowed, f"http://127.0.0.1:{target.port}/hook", b"{}", {}) == 204
    redirecting = Hook(status=302, location=f"http://127.0.0.1:{target.port}/stolen")
    assert callbacks.post(allowed, f"http://127.0.0.1:{redirecting.port}/hook", b"{}", {}) == 302
    assert target.calls == ["/hook"] and redirecting.calls == ["/hook"]
    for hook in (target, redirecting):
        hook.server.shutdown()


def test_callbacks_have_their_own_queue(pg_settings):
    app = broker.celery_for(pg_settings)
    assert app.amqp.router.route({}, broker.TASK_CALLBACK)["queue"].name == broker.CALLBACKS
    assert app.amqp.router.route({}, broker.TASK_SCORE)["queue"].name == broker.BULK
