"""Batch completion callbacks: an HMAC-signed POST, retried with backoff until it is accepted."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Program
from dermascan.results_out import callbacks
from dermascan.security.accounts import issue_callback_secret
from tests.ham_files import ham_zip
from tests.services import wait_for


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
        secret = issue_callback_secret(session.get(Program, program_id), settings.secret_key)
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


def test_callback_url_must_be_http(pg_settings, live_server, api_token, ham_dir):
    server = live_server(pg_settings)
    _, token = api_token()
    archive, _ = ham_zip(ham_dir, 1)
    reply = requests.post(f"{server.url}/api/v1/batches", headers={"Authorization": f"Bearer {token}"},
                          files={"archive": ("a.zip", archive)}, data={"callback_url": "file:///etc/passwd"}, timeout=60)  # fmt: skip
    assert reply.status_code == 400 and "callback_url" in reply.json()["error"]
