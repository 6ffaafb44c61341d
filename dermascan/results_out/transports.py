"""How objects reach a destination: one interface (``Transport.send``: all of a study's due objects
in one association or one request), two implementations — DIMSE C-STORE (``Dimse``, optional TLS
with DermaScan's own certificate) and STOW-RS (``Stow``, with basic or bearer credentials). Both
have bounded waits, and both say which failures are worth retrying (``Unreachable``: down, timed
out, rejected for now) and which are not (``Refused``: the destination answered no)."""

from __future__ import annotations

import ssl
from typing import Protocol

from pydicom.dataset import Dataset

from dermascan.config import Settings
from dermascan.infra.schema import DicomDestination
from dermascan.security import keys, outbound

STORE_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the warnings (coercion, elements discarded)


class Refused(Exception):
    """The destination answered and will not take the objects: retrying will not help."""


class Unreachable(Exception):
    """The destination could not be reached or did not answer: try again later."""


class Transport(Protocol):
    def send(self, destination: DicomDestination, datasets: list[Dataset]) -> None:
        """Store ``datasets`` at ``destination``; raise Refused or Unreachable when it does not."""


class Dimse:
    """C-STORE in one association, from the AE title DermaScan calls as."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def send(self, destination: DicomDestination, datasets: list[Dataset]) -> None:
        send_dimse(self.settings, destination, datasets)


class Stow:
    """STOW-RS in one request (dicomweb-client)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def send(self, destination: DicomDestination, datasets: list[Dataset]) -> None:
        send_stow(self.settings, destination, datasets)


def transport_for(settings: Settings, destination: DicomDestination) -> Transport:
    return Dimse(settings) if destination.kind == "dimse" else Stow(settings)


def send_dimse(settings: Settings, destination: DicomDestination, datasets: list[Dataset]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage  # noqa: F401 (registers the class names)

    ae = AE(ae_title=settings.dicom_calling_ae)
    # bounded waits: a destination that does not answer costs a worker seconds, not minutes
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 5, 10, 30, 30
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    tls_args = None
    if destination.tls:
        context = ssl.create_default_context(cafile=settings.dicom_tls_ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.dicom_tls_client_cert:
            context.load_cert_chain(settings.dicom_tls_client_cert, settings.dicom_tls_client_key or None)
        tls_args = (context, destination.host)
    # the address checked at connect time is the one connected to (the name is kept for TLS)
    address = _checked_address(settings, destination.host, destination.port)
    assoc = ae.associate(address, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = f"{primitive.result_str}, {primitive.reason_str}" if primitive is not None else "rejected"
        if primitive is not None and primitive.result == 0x02:  # rejected-transient
            raise Unreachable(f"association rejected for now by {destination.target}: {reason}")
        raise Refused(f"association rejected by {destination.target}: {reason}")
    if not assoc.is_established:
        raise Unreachable(f"no association with {destination.target} (connection refused, lost or timed out)")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise Unreachable(f"no C-STORE answer from {destination.target}")
            if status.Status not in STORE_OK:
                raise Refused(f"C-STORE of {ds.SOPClassUID.name} refused by {destination.target}: status 0x{status.Status:04X}")  # fmt: skip
    finally:
        if assoc.is_established:
            assoc.release()


def _checked_address(settings: Settings, host: str, port: int) -> str:
    """The first address of ``host`` the destination rule allows (Refused when none is)."""
    from dermascan.results_out.destinations import policy

    try:
        return policy(settings).resolve(host, port)[0][3][0]
    except outbound.OutboundRefused as exc:
        raise Refused(str(exc)) from None
    except OSError as exc:
        raise Unreachable(f"{host}: {exc}") from None


def _timed_session(settings: Settings):
    """A requests session for dicomweb-client: every request has a timeout (connect 5 s, read 60 s),
    every connection is made to an address the destination rule allows (checked after resolving,
    for each connection), and no redirect is followed."""
    import requests
    import urllib3
    from requests.adapters import HTTPAdapter

    from dermascan.results_out.destinations import policy

    rule = policy(settings)

    def new_conn(self):
        try:
            return rule.connect(
                self._dns_host, self.port, self.timeout if isinstance(self.timeout, int | float) else None
            )
        except outbound.OutboundRefused as exc:
            raise Refused(str(exc)) from None

    http_cls = type("GuardedHTTPConnection", (urllib3.connection.HTTPConnection,), {"_new_conn": new_conn})
    https_cls = type("GuardedHTTPSConnection", (urllib3.connection.HTTPSConnection,), {"_new_conn": new_conn})
    pools = {
        "http": type("GuardedHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http_cls}),
        "https": type("GuardedHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https_cls}),
    }

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    class TimedSession(requests.Session):
        def request(self, *args, **kwargs):
            kwargs.setdefault("timeout", (5, 60))
            kwargs["allow_redirects"] = False
            return super().request(*args, **kwargs)

    session = TimedSession()
    session.trust_env = False  # no proxy from the environment: the rule is checked on the real peer
    for prefix in ("http://", "https://"):
        session.mount(prefix, GuardedAdapter())
    return session


def send_stow(settings: Settings, destination: DicomDestination, datasets: list[Dataset]) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = _timed_session(settings)
    if destination.secret_encrypted:
        secret = keys.destination_cipher(settings.secret_key).decrypt(destination.secret_encrypted).decode()
        if destination.username:
            session.auth = (destination.username, secret)
        else:
            session.headers["Authorization"] = f"Bearer {secret}"
    client = DICOMwebClient(url=destination.url, session=session)
    try:
        client.store_instances(datasets)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code is not None and 400 <= code < 500 and code not in (408, 429):
            raise Refused(f"STOW-RS to {destination.url} answered {code}") from exc
        raise Unreachable(f"STOW-RS to {destination.url} answered {code}") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Unreachable(f"STOW-RS to {destination.url}: {type(exc).__name__}") from exc
