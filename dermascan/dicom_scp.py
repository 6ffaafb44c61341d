"""The DIMSE C-STORE receiver (``dermascan dicom-scp``), built on pynetdicom.

C-ECHO answers; C-STORE of VL Photographic and Dermoscopic Photography images (uncompressed or
JPEG baseline) goes through the same parsing and screening service as STOW-RS. Every storage
SOP class may be offered, so an unsupported one is refused per instance with 0x0122 (SOP Class
not supported) rather than by a silent presentation-context rejection. Each instance is
committed before its success status is sent (persist first); the studies of an association form
one batch and are enqueued in chunks. Accepted sockets set TCP_NODELAY (without it, Nagle's
algorithm holds every small response for ~40–70 ms).
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import socketserver
import threading

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from dermascan import screening
from dermascan.config import Settings
from dermascan.db import session_factory
from dermascan.ingest import dicom
from dermascan.schema import Batch, Study

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


class NoDelayServer(ThreadedAssociationServer):
    def get_request(self):
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def shutdown(self) -> None:
        # made by AE.make_server, so not in the AE's list of servers that the base class edits
        socketserver.TCPServer.shutdown(self)
        self.server_close()


class Receiver:
    """The C-STORE handler state: settings, program, and one batch per association."""

    def __init__(self, settings: Settings, program_id: int):
        self.settings = settings
        self.program_id = program_id
        # no liveness ping per instance (a round trip each); a dropped connection is retried once
        self.factory = session_factory(settings.database_url, pre_ping=False)
        self.lock = threading.Lock()
        self.batches: dict[int, str] = {}
        self.pending: dict[int, list[int]] = {}

    def _batch_for(self, event) -> str:
        key = id(event.assoc)
        with self.lock:
            if key in self.batches:
                return self.batches[key]
        calling = event.assoc.requestor.ae_title
        with self.factory() as session, session.begin():
            batch = Batch(
                program_id=self.program_id,
                source="dicom",
                label=f"C-STORE from {calling} at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}",
            )
            session.add(batch)
            session.flush()
            batch_id = batch.id
        with self.lock:
            self.batches[key] = batch_id
            self.pending[key] = []
        return batch_id

    def _store(self, event, parsed):
        batch_id = self._batch_for(event)
        command = screening.SubmitStudies(
            self.settings, self.program_id, [parsed.study], source="dicom", batch_id=batch_id
        )
        with self.factory() as session, session.begin():
            return command.run(session)

    def handle_echo(self, event) -> int:
        return SUCCESS

    def handle_store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            parsed = dicom.parse_dataset(ds)
        except dicom.DicomRejected as exc:
            log.info("C-STORE refused (0x%04X): %s", exc.status, exc.reason)
            return exc.status
        except Exception as exc:  # pydicom raises many kinds for a malformed dataset
            log.info("C-STORE refused, cannot read the dataset: %s", exc)
            return dicom.CANNOT_UNDERSTAND
        for attempt in (1, 2):  # once more when the pooled connection had been dropped
            try:
                result = self._store(event, parsed)
                break
            except DBAPIError as exc:
                if attempt == 1 and exc.connection_invalidated:
                    log.warning("database connection dropped; storing %s again", parsed.sop_instance_uid)
                    continue
                log.exception("C-STORE of %s could not be stored", parsed.sop_instance_uid)
                return OUT_OF_RESOURCES
            except Exception:
                log.exception("C-STORE of %s could not be stored", parsed.sop_instance_uid)
                return OUT_OF_RESOURCES
        if result.rejected:
            log.info("C-STORE refused: %s", result.rejected[0].reason)
            return dicom.CANNOT_UNDERSTAND
        if result.new_study_ids:
            key = id(event.assoc)
            with self.lock:
                self.pending[key].extend(result.new_study_ids)
                ready = len(self.pending[key]) >= self.settings.bulk_chunk_size
                chunk = self.pending.pop(key) if ready else None
                if ready:
                    self.pending[key] = []
            if chunk:
                screening.enqueue(self.settings, chunk, interactive=False)
        return SUCCESS

    def handle_closed(self, event) -> None:
        key = id(event.assoc)
        with self.lock:
            chunk = self.pending.pop(key, [])
            batch_id = self.batches.pop(key, None)
        if batch_id:
            with self.factory() as session, session.begin():
                count = select(func.count()).select_from(Study).where(Study.batch_id == batch_id).scalar_subquery()
                session.execute(update(Batch).where(Batch.id == batch_id).values(total=count))
        if chunk:
            screening.enqueue(self.settings, chunk, interactive=False)


def make_ae(ae_title: str, allowed_callers: list[str] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    syntaxes = [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian]  # compressed kept as sent
    for uid in dicom.SUPPORTED_SOP_CLASSES:
        ae.add_supported_context(uid, syntaxes)
    for context in StoragePresentationContexts:
        if len(ae.supported_contexts) >= 127:
            break
        if context.abstract_syntax not in dicom.SUPPORTED_SOP_CLASSES:
            ae.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if allowed_callers:
        ae.require_calling_aet = allowed_callers
    ae.maximum_pdu_size = 0  # no limit on P-DATA size we accept
    return ae


def make_server(
    settings: Settings, ae_title: str, host: str, port: int, program: str, allowed_callers: list[str] | None = None
):
    """A running (non-blocking) C-STORE server. Call ``shutdown()`` to stop it."""
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = screening.get_or_create_program(session, program).id
    receiver = Receiver(settings, program_id)
    ae = make_ae(ae_title, allowed_callers)
    handlers = [
        (evt.EVT_C_ECHO, receiver.handle_echo),
        (evt.EVT_C_STORE, receiver.handle_store),
        (evt.EVT_RELEASED, receiver.handle_closed),
        (evt.EVT_ABORTED, receiver.handle_closed),
        (evt.EVT_CONN_CLOSE, receiver.handle_closed),
    ]
    server = ae.make_server((host, port), evt_handlers=handlers, server_class=NoDelayServer)
    thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
    thread.start()
    server.receiver = receiver
    return server
