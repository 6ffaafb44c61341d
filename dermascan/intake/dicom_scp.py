"""The DIMSE C-STORE receiver (``dermascan dicom-scp``), built on pynetdicom.

C-ECHO answers; C-STORE of VL Photographic and Dermoscopic Photography images (uncompressed or
JPEG baseline) goes through the same parsing and screening service as STOW-RS. Every storage
SOP class may be offered, so an unsupported one is refused per instance with 0x0122 (SOP Class
not supported) rather than by a silent presentation-context rejection. Each instance is
committed before its success status is sent (persist first); the studies of an association form
one batch and are enqueued in chunks. Accepted sockets set TCP_NODELAY (without it, Nagle's
algorithm holds every small response for ~40–70 ms).

The door is closed by default (docs/security.md): the receiver refuses to start without an
allow-list of calling AE titles unless ``--allow-any`` is given. Each entry,
``AE[@ADDRESS-OR-NETWORK][=PROGRAM]``, may pin the caller's source address or network and names
the program its studies belong to. The called AE title must be ours. A connection from an
address no entry allows is closed before any DICOM is read; a known AE from the wrong address is
aborted. A dataset larger than ``max_dicom_bytes`` aborts the association as it arrives (the
bytes are counted per P-DATA PDU, before the dataset is assembled), and DICOM TLS is optional
(a certificate and key; a CA file makes client certificates required).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
from dataclasses import dataclass, field

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import DBAPIError

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.ingest import dicom
from dermascan.intake import submission
from dermascan.security import identity

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
NOT_AUTHORIZED = 0x0124  # Refused: Not Authorized (PS3.7 C.4.2.1.4)
# the largest P-DATA PDU we announce; honest peers fragment a dataset into PDUs this size, so the
# size cap is checked every megabyte
MAX_PDU = 1024 * 1024


class DoorError(ValueError):
    """A receiver configuration that would leave the DICOM door open or cannot be read."""


@dataclass(frozen=True)
class Caller:
    """One allow-list entry: a calling AE title, optionally pinned to an address or network,
    and the program its studies belong to."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    program: str

    @classmethod
    def parse(cls, entry: str, default_program: str) -> Caller:
        text = entry.strip()
        program = default_program
        if "=" in text:
            text, program = (part.strip() for part in text.split("=", 1))
        network = None
        if "@" in text:
            text, where = (part.strip() for part in text.split("@", 1))
            try:
                network = ipaddress.ip_network(where, strict=False)
            except ValueError:
                raise DoorError(f"{entry!r}: {where!r} is not an IP address or network") from None
        if not text or len(text) > 16 or not text.isprintable() or "\\" in text:
            raise DoorError(f"{entry!r}: an AE title of 1–16 characters is needed")
        if not program:
            raise DoorError(f"{entry!r}: the program after '=' is empty")
        return cls(text, network, program)

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title.strip() == self.ae_title and self.admits_address(address)

    def admits_address(self, address: str) -> bool:
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False


@dataclass
class AllowList:
    """Who may store: the entries, or anyone (``allow_any``, the demo) into the default program."""

    callers: list[Caller] = field(default_factory=list)
    allow_any: bool = False
    default_program: str = "dicom"

    @classmethod
    def from_entries(cls, entries, default_program: str, allow_any: bool = False) -> AllowList:
        callers = [Caller.parse(e, default_program) for item in entries or () for e in item.split(",") if e.strip()]
        if not callers and not allow_any:
            raise DoorError(
                "refusing to start the DICOM receiver without an allow-list: give --allow AE[@NETWORK][=PROGRAM] "
                "(or DERMASCAN_DICOM_ALLOW), or --allow-any to accept every caller (demos only)"
            )
        return cls(callers, allow_any and not callers, default_program)

    def programs(self) -> set[str]:
        return {c.program for c in self.callers} or {self.default_program}

    def match(self, ae_title: str, address: str) -> str | None:
        """The program of this (calling AE, address), or None when it may not store."""
        if self.allow_any:
            return self.default_program
        return next((c.program for c in self.callers if c.admits(ae_title, address)), None)

    def address_allowed(self, address: str) -> bool:
        return self.allow_any or any(c.admits_address(address) for c in self.callers)


def tls_context(cert: str | None, key: str | None, ca: str | None = None) -> ssl.SSLContext | None:
    """DICOM TLS (PS3.15 B.1): our certificate and key; a CA file requires client certificates."""
    if not cert and not key:
        if ca:
            raise DoorError("--tls-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise DoorError("DICOM TLS needs both --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise DoorError(f"cannot load the TLS certificate, key or CA: {exc}") from None
    return context


class NoDelayServer(ThreadedAssociationServer):
    allow: AllowList | None = None

    def get_request(self):
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request, client_address) -> bool:
        """A connection from an address that no allow-list entry admits is closed unread."""
        if self.allow is not None and not self.allow.address_allowed(client_address[0]):
            log.warning("DICOM connection from %s refused: no allow-list entry admits the address", client_address[0])
            return False
        return super().verify_request(request, client_address)

    def shutdown(self) -> None:
        # made by AE.make_server, so not in the AE's list of servers that the base class edits
        socketserver.TCPServer.shutdown(self)
        self.server_close()


class Receiver:
    """The C-STORE handler state: settings, program, and one batch per association."""

    def __init__(self, settings: Settings, allow: AllowList, program_ids: dict[str, int]):
        self.settings = settings
        self.allow = allow
        self.program_ids = program_ids
        self.lock = threading.Lock()
        self.streams: dict[int, submission.BatchStream] = {}
        self.received: dict[int, int] = {}  # bytes of the dataset arriving on each association

    def program_of(self, assoc) -> int | None:
        program = self.allow.match(assoc.requestor.ae_title, assoc.requestor.address)
        return None if program is None else self.program_ids[program]

    def handle_accepted(self, event) -> None:
        """A listed AE title calling from an address its entry does not admit is aborted."""
        if self.program_of(event.assoc) is None:
            log.warning(
                "DICOM association from %s at %s aborted: not on the allow-list from that address",
                event.assoc.requestor.ae_title, event.assoc.requestor.address,
            )  # fmt: skip
            event.assoc.abort()

    def handle_data(self, event) -> None:
        """Counts the dataset's bytes as its PDUs arrive; past the cap the association is aborted
        before the dataset is assembled, decoded or stored."""
        key = id(event.assoc)
        with self.lock:
            total = self.received.get(key, 0) + len(event.data)
            self.received[key] = total
        if total > self.settings.max_dicom_bytes:
            log.warning(
                "DICOM association from %s aborted: a dataset over %d bytes",
                event.assoc.requestor.ae_title, self.settings.max_dicom_bytes,
            )  # fmt: skip
            event.assoc.abort()

    def _stream_for(self, event, program_id: int) -> submission.BatchStream:
        """The association's batch (one per association), made on its first instance."""
        key = id(event.assoc)
        with self.lock:
            if key not in self.streams:
                calling = event.assoc.requestor.ae_title
                self.streams[key] = submission.BatchStream(
                    self.settings, program_id, "dicom",
                    f"C-STORE from {calling} at {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S}",
                    ip=event.assoc.requestor.address, detail={"calling_ae": calling},
                )  # fmt: skip
            return self.streams[key]

    def handle_echo(self, event) -> int:
        return SUCCESS

    def handle_store(self, event) -> int:
        with self.lock:
            self.received[id(event.assoc)] = 0  # the next dataset starts counting from here
        program_id = self.program_of(event.assoc)
        if program_id is None:
            return NOT_AUTHORIZED
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            parsed = dicom.parse_dataset(ds, self.settings)
        except dicom.DicomRejected as exc:
            log.info("C-STORE refused (0x%04X): %s", exc.status, exc.reason)
            return exc.status
        except Exception as exc:  # pydicom raises many kinds for a malformed dataset
            log.info("C-STORE refused, cannot read the dataset: %s", exc)
            return dicom.CANNOT_UNDERSTAND
        stream = self._stream_for(event, program_id)
        for attempt in (1, 2):  # once more when the pooled connection had been dropped
            try:
                result = stream.add(parsed.study)
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
        return SUCCESS

    def handle_closed(self, event) -> None:
        key = id(event.assoc)
        with self.lock:
            stream = self.streams.pop(key, None)
            self.received.pop(key, None)
        if stream is not None:
            stream.close()


def make_ae(ae_title: str, allowed_callers: list[str] | None = None) -> AE:
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True  # an association addressed to another AE title is rejected
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
    ae.maximum_pdu_size = MAX_PDU
    return ae


def make_server(
    settings: Settings,
    ae_title: str,
    host: str,
    port: int,
    allow: AllowList,
    tls: ssl.SSLContext | None = None,
):
    """A running (non-blocking) C-STORE server. Call ``shutdown()`` to stop it."""
    with session_factory(settings.database_url)() as session, session.begin():
        program_ids = {name: identity.get_or_create_program(session, name).id for name in allow.programs()}
    receiver = Receiver(settings, allow, program_ids)
    ae = make_ae(ae_title, None if allow.allow_any else sorted({c.ae_title for c in allow.callers}))
    handlers = [
        (evt.EVT_ACCEPTED, receiver.handle_accepted),
        (evt.EVT_DATA_RECV, receiver.handle_data),
        (evt.EVT_C_ECHO, receiver.handle_echo),
        (evt.EVT_C_STORE, receiver.handle_store),
        (evt.EVT_RELEASED, receiver.handle_closed),
        (evt.EVT_ABORTED, receiver.handle_closed),
        (evt.EVT_CONN_CLOSE, receiver.handle_closed),
    ]
    server = ae.make_server((host, port), evt_handlers=handlers, server_class=NoDelayServer, ssl_context=tls)
    server.allow = allow
    thread = threading.Thread(target=server.serve_forever, name="dicom-scp", daemon=True)
    thread.start()
    server.receiver = receiver
    return server
