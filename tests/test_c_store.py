"""intake/dicom_scp, the C-STORE door, with real clients (dcmtk's storescu and pynetdicom): studies
stored in one batch per association and scored; the allow-list, called-AE check, source pinning,
per-caller programs, dataset size cap and TLS; pixel limits checked from the header before anything
is decoded; a dropped database connection survived."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import ssl
import subprocess

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select, text

from dermascan.cli import main
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Program, Study
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC
from dermascan.intake.dicom_scp import AllowList, DoorError, make_server, tls_context
from tests.dicom_factory import SECONDARY_CAPTURE, make_instance, monochrome_uncompressed, write
from tests.ham_files import ham_images, ham_rows
from tests.helpers import status_counts
from tests.services import free_port, wait_for

JPEG = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def jpegs(ham_dir):
    return list(ham_images(ham_dir, ham_rows(ham_dir, 6).isic_id).values())


@pytest.fixture
def receiver(pg_settings):
    servers = []

    def start(entries=(), settings=None, allow_any=False, tls=None, program="door"):
        port = free_port()
        allow = AllowList.from_entries(list(entries), program, allow_any)
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


def studies(settings) -> list[Study]:
    with session_factory(settings.database_url)() as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def test_storescu_and_pynetdicom_store_and_get_scored(pg_settings, receiver, start_worker, jpegs, tmp_path):
    settings = pg_settings
    port = receiver(allow_any=True, program="hospital-b")
    # C-ECHO
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    # dcmtk's storescu (a client we did not write) sends a JPEG and an uncompressed instance
    files = []
    for i, (jpeg, compressed) in enumerate([(jpegs[0], True), (jpegs[1], False)]):
        path = tmp_path / f"i{i}.dcm"
        write(
            make_instance(
                jpeg, age=45 + i, sex="female", site="upper extremity", patient_id="PAT-9", compressed=compressed
            ),
            path,
        )
        files.append(path)
    storescu = shutil.which("storescu", path="/usr/bin:/usr/local/bin")
    assert storescu, "dcmtk's storescu is needed (Debian package dcmtk; .ci/run installs it)"
    done = subprocess.run(
        [storescu, "-aet", "MODALITY", "-aec", "DERMASCAN", "-R", "-xy", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr

    # pynetdicom as a second client, with a SOP class we do not accept
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
    ae.add_requested_context(SECONDARY_CAPTURE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    good = make_instance(jpegs[2], age=80, sex="male", site="posterior torso")
    assert assoc.send_c_store(good).Status == 0x0000
    assert assoc.send_c_store(good).Status == 0x0000  # re-sent: no second study
    sc = make_instance(jpegs[3], sop_class=SECONDARY_CAPTURE, compressed=False)
    assert assoc.send_c_store(sc).Status == 0x0122
    nopix = make_instance(jpegs[4], with_pixels=False)
    nopix.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    status = assoc.send_c_store(nopix)
    assert status.Status == 0xA900
    assoc.release()

    start_worker(settings)
    wait_for(lambda: status_counts(settings).get("done") == 3, 120, message="C-STORE studies scored")
    rows = studies(settings)
    assert [(s.meta["age_approx"], s.meta["sex"], s.meta["anatom_site_general"]) for s in rows] == [
        (45.0, "female", "upper extremity"),
        (46.0, "female", "upper extremity"),
        (80.0, "male", "posterior torso"),
    ]
    assert rows[0].sop_instance_uid == dcmread(files[0]).SOPInstanceUID
    assert {s.source for s in rows} == {"dicom"}
    assert rows[0].batch_id == rows[1].batch_id != rows[2].batch_id  # one batch per association


def test_calling_ae_allow_list(pg_settings, receiver):
    port = receiver(["TRUSTED"], program="hospital-b")
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_rejected
    ae = AE(ae_title="TRUSTED")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_established
    assoc.release()


def test_c_store_survives_a_dropped_database_connection(pg_settings, receiver, jpegs):
    """The receiver skips the pool's per-checkout ping (a round trip per instance): a connection the
    database dropped (restart, failover, idle timeout) is found on use and the instance stored again."""
    port = receiver(allow_any=True, program="hospital-b")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.send_c_store(make_instance(jpegs[0])).Status == 0x0000
    with session_factory(pg_settings.database_url)() as session:
        dropped = session.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert dropped >= 1  # the receiver's pooled connection among them
    assert assoc.send_c_store(make_instance(jpegs[1])).Status == 0x0000
    assoc.release()
    assert len(studies(pg_settings)) == 2
