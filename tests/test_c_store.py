"""The DICOM door (issue 11): the C-STORE receiver's allow-list, called-AE check, source pinning,
per-caller programs, dataset size cap and TLS; pixel limits checked from the header before
anything is decoded, on both C-STORE and STOW-RS — with pynetdicom as the real client."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dermascan.cli import main
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Program, Study
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC
from dermascan.intake.dicom_scp import AllowList, DoorError, make_server, tls_context
from tests.dicom_factory import make_instance, monochrome_uncompressed, stow, to_bytes
from tests.ham_files import ham_images, ham_rows
from tests.services import free_port, wait_for

JPEG = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def jpegs(ham_dir):
    return list(ham_images(ham_dir, ham_rows(ham_dir, 3).isic_id).values())


@pytest.fixture
def receiver(pg_settings):
    servers = []

    def start(entries=(), settings=None, allow_any=False, tls=None):
        port = free_port()
        allow = AllowList.from_entries(list(entries), "door", allow_any)
        servers.append(make_server(settings or pg_settings, "DERMASCAN", "127.0.0.1", port, allow, tls))
        return port

    yield start
    for server in servers:
        server.shutdown()


def stored(settings) -> list[tuple[str, str]]:
    with session_factory(settings.database_url)() as session:
        rows = session.execute(
            select(Study.sop_instance_uid, Program.name).join(Program, Program.id == Study.program_id)
        )
        return sorted(rows.all())


def client(ae_title: str, *contexts) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    for sop_class, syntax in contexts or [(DERMOSCOPIC_PHOTOGRAPHY, JPEG)]:
        ae.add_requested_context(sop_class, [syntax])
    return ae


def test_the_receiver_refuses_to_start_without_an_allow_list(pg_settings):
    with pytest.raises(DoorError, match="allow-list"):
        AllowList.from_entries([], "dicom")
    result = CliRunner().invoke(
        main,
        ["--data-dir", str(pg_settings.data_dir), "dicom-scp", "--port", str(free_port())],
        env=pg_settings.as_env(),
    )
    assert result.exit_code == 2 and "allow-list" in result.output
    for bad in ["", "A@not-a-network", "WAY-TOO-LONG-AE-TITLE", "PACS="]:
        with pytest.raises(DoorError):
            AllowList.from_entries([bad or "@10.0.0.1"], "dicom")


def test_called_ae_pinned_sources_and_a_program_per_caller(pg_settings, receiver, jpegs):
    port = receiver(["PACS@127.0.0.1=derm-a", "MODALITY@10.20.0.0/16=derm-b", "LAB=derm-c"])
    # called AE title must be ours
    assoc = client("PACS").associate("127.0.0.1", port, ae_title="SOMEONE")
    assert assoc.is_rejected
    # an AE title not on the list
    assert client("STRANGER").associate("127.0.0.1", port, ae_title="DERMASCAN").is_rejected
    # a listed AE title from an address its entry does not admit: aborted, nothing stored
    assoc = client("MODALITY").associate("127.0.0.1", port, ae_title="DERMASCAN")
    wait_for(lambda: not assoc.is_established, 10, message="the pinned AE from the wrong address aborted")
    # allowed callers store into their own programs
    a, c = make_instance(jpegs[0]), make_instance(jpegs[1])
    for ae_title, ds in (("PACS", a), ("LAB", c)):
        assoc = client(ae_title).associate("127.0.0.1", port, ae_title="DERMASCAN")
        assert assoc.is_established
        assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    assert stored(pg_settings) == sorted([(a.SOPInstanceUID, "derm-a"), (c.SOPInstanceUID, "derm-c")])


def test_an_address_no_entry_admits_is_closed_unread(pg_settings, receiver):
    port = receiver(["PACS@192.0.2.0/24"])
    assoc = client("PACS").associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert not assoc.is_established


def test_a_dataset_over_the_cap_aborts_the_association_and_big_images_are_refused_from_the_header(
    pg_settings, receiver, jpegs
):
    settings = pg_settings.replace(max_dicom_bytes=2_000_000, max_image_pixels=1_000_000)
    port = receiver(["PACS"], settings=settings)
    syntax = (VL_PHOTOGRAPHIC, ExplicitVRLittleEndian)
    # 1,200 × 1,200 = 1.44 M pixels: under the byte cap, over the pixel limit → refused unread
    assoc = client("PACS", syntax).associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.send_c_store(monochrome_uncompressed(jpegs[0], 1200, 1200)).Status == 0xA700
    # Pixel Data shorter than the header says → refused
    short = monochrome_uncompressed(jpegs[0], 500, 500)
    short.PixelData = short.PixelData[:1000]
    assert assoc.send_c_store(short).Status == 0xA900
    # 1,600 × 1,600 = 2.56 MB: past the dataset cap → the association is aborted as it arrives
    status = assoc.send_c_store(monochrome_uncompressed(jpegs[0], 1600, 1600))
    assert "Status" not in status  # no response: the association was aborted
    wait_for(lambda: not assoc.is_established, 10, message="the association aborted")
    assert stored(pg_settings) == []


def test_stow_rs_refuses_oversized_parts_and_stores_the_rest(pg_settings, live_server, api_token, jpegs):
    settings = pg_settings.replace(max_dicom_bytes=2_000_000, max_image_pixels=1_000_000)
    server = live_server(settings)
    _, token = api_token("stow-limits")
    good = make_instance(jpegs[0])
    parts = [
        to_bytes(good),
        to_bytes(monochrome_uncompressed(jpegs[1], 1600, 1600)),
        to_bytes(monochrome_uncompressed(jpegs[1], 1100, 1100)),
    ]
    reply = stow(server.url, token, parts)
    assert reply.status_code == 202, reply.text
    answer = reply.json()
    failed = answer["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [0xA700, 0xA700]
    reasons = [item["00000902"]["Value"][0] for item in failed]
    assert "part 2" in reasons[0] and "limit" in reasons[0]
    assert "part 3" in reasons[1] and "pixels" in reasons[1]
    assert [uid for uid, _ in stored(pg_settings)] == [good.SOPInstanceUID]
    # a body that breaks off before its closing boundary is refused as a whole
    cut = stow(server.url, token, parts, cut=len(to_bytes(good)) + 200)
    assert cut.status_code == 400


def make_cert(tmp_path, name: str, issuer_key=None, issuer_name=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=issuer_key is None, path_length=None), True)
        .sign(issuer_key or key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path, key, subject


def test_dicom_tls_with_required_client_certificates(pg_settings, receiver, jpegs, tmp_path):
    ca_cert, _, ca_key, ca_name = make_cert(tmp_path, "ca")
    server_cert, server_key, _, _ = make_cert(tmp_path, "server", ca_key, ca_name)
    client_cert, client_key, _, _ = make_cert(tmp_path, "client", ca_key, ca_name)
    with pytest.raises(DoorError):
        tls_context(str(server_cert), None)
    port = receiver(["PACS"], tls=tls_context(str(server_cert), str(server_key), str(ca_cert)))

    def tls_client(with_cert: bool):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
        if with_cert:
            context.load_cert_chain(str(client_cert), str(client_key))
        return context, "127.0.0.1"

    ds = make_instance(jpegs[0])
    assoc = client("PACS").associate("127.0.0.1", port, ae_title="DERMASCAN", tls_args=tls_client(True))
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    # no client certificate, or no TLS at all: no association
    assert (
        not client("PACS").associate("127.0.0.1", port, ae_title="DERMASCAN", tls_args=tls_client(False)).is_established
    )
    assert not client("PACS").associate("127.0.0.1", port, ae_title="DERMASCAN").is_established
    assert [uid for uid, _ in stored(pg_settings)] == [ds.SOPInstanceUID]
