"""FHIR R4 for the EHR (issue 13, item 4): a study's DiagnosticReport with its Observations, the
ImagingStudy and the algorithm as a Device, and a batch as a collection Bundle — validated with
fhir.resources' R4 (R4B) models."""

from __future__ import annotations

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from sqlalchemy import select

from dermascan.governance import bundles
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Decision, Referral, ReferralStatus, Study, StudyStatus, utcnow
from dermascan.intake.submission import submit
from dermascan.referrals import queue as referrals
from dermascan.screening import results
from tests.helpers import ham_inputs


def test_study_results_as_fhir_diagnostic_reports(pg_settings, tiny_bundle, app_factory, api_token, ham_dir):
    # the installation's own identifier systems for the sender's identifiers
    settings = pg_settings.replace(fhir_reference_system="https://ehr.example.org/ids/{program}/lesion-study")
    program_id, token = api_token("ehr")
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        bundle = bundles.register(session, tiny_bundle)
        from dermascan.security.accounts import create_user

        doctor = create_user(session, "dr-fhir", "correct-horse-battery", "specialist", program_id)
        doctor_id = doctor.id
    inputs = ham_inputs(ham_dir, 3)
    inputs[0].patient_id = "MRN-FHIR"
    inputs[0].study_instance_uid = "1.2.826.0.1.3680043.8.498.1"
    result = submit(settings, program_id, inputs, source="test")
    referred, cleared, waiting = (a.study_id for a in result.accepted)
    with factory() as session, session.begin():
        for sid in (referred, cleared):
            session.get(Study, sid).status = StudyStatus.PROCESSING
        results.record(
            session, bundle.version, 0.5, [results.ScoredStudy(referred, 0.83), results.ScoredStudy(cleared, 0.12)]
        )
        referral = session.scalar(select(Referral).where(Referral.study_id == referred))
        referral.status, referral.claimed_by_id, referral.claimed_at = ReferralStatus.CLAIMED, doctor_id, utcnow()
        referrals.decide(session, referral.id, doctor_id, Decision.BIOPSY, "irregular network", 1800)
    client = app_factory(settings).test_client()
    headers = {"Authorization": f"Bearer {token}"}

    reply = client.get(f"/api/v1/studies/{referred}/fhir", headers=headers)
    assert reply.status_code == 200 and reply.mimetype == "application/fhir+json"
    report = DiagnosticReport.parse_obj(reply.json)  # the R4 model: raises on anything invalid
    contained = {r.id: r for r in report.contained}
    assert report.status == "amended" and report.imagingStudy[0].reference == "#imaging-study"
    assert float(contained["probability"].valueQuantity.value) == 0.83
    assert contained["referral"].valueCodeableConcept.coding[0].code == "high_risk"
    decision = contained["decision"]
    assert decision.valueCodeableConcept.coding[0].code == Decision.BIOPSY.value
    assert decision.note[0].text == "irregular network" and decision.performer[0].display == "dr-fhir"
    assert contained["algorithm"].version[0].value == bundle.version
    assert contained["algorithm"].identifier[0].value == bundle.sha256
    assert contained["imaging-study"].identifier[0].value == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert report.subject.identifier.value and "MRN-FHIR" not in reply.text  # pseudonym only
    # the sender's reference comes back under the installation's system, beside DermaScan's id
    with factory() as session:
        reference = session.get(Study, referred).external_id
    placer = [i for i in report.identifier if i.type and i.type.coding[0].code == "PLAC"]
    assert reference and [(i.system, i.value) for i in placer] == [
        ("https://ehr.example.org/ids/ehr/lesion-study", reference)
    ]

    cleared_report = DiagnosticReport.parse_obj(client.get(f"/api/v1/studies/{cleared}/fhir", headers=headers).json)
    assert cleared_report.status == "final" and "not referred" in cleared_report.conclusion
    pending = DiagnosticReport.parse_obj(client.get(f"/api/v1/studies/{waiting}/fhir", headers=headers).json)
    assert pending.status == "registered" and not pending.result

    bundle_reply = client.get(f"/api/v1/batches/{result.batch_id}/results?format=fhir", headers=headers)
    assert bundle_reply.status_code == 200 and bundle_reply.mimetype == "application/fhir+json"
    collection = Bundle.parse_obj(bundle_reply.json)
    assert collection.type == "collection"
    assert [e.resource.id for e in collection.entry] == [f"study-{s}" for s in (referred, cleared, waiting)]
    # another program's token sees nothing
    _, other = api_token("someone-else")
    assert (
        client.get(f"/api/v1/studies/{referred}/fhir", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    )


def test_a_dicom_studys_accession_number_comes_back_in_its_report(pg_settings, api_token, ham_dir):
    """The accession number is kept only inside the encrypted header; the report reads it there."""
    import io

    from pydicom import dcmread

    from dermascan.ingest.dicom import header_bytes
    from dermascan.results_out import fhir
    from tests.dicom_factory import make_instance, to_bytes

    settings = pg_settings
    program_id, _ = api_token("pacs-site")
    inputs = ham_inputs(ham_dir, 1)
    ds = make_instance(inputs[0].image)
    ds.AccessionNumber = "ACC-0077"
    inputs[0].dicom_header = header_bytes(dcmread(io.BytesIO(to_bytes(ds))))
    result = submit(settings, program_id, inputs, source="test")
    with session_factory(settings.database_url)() as session:
        study = session.get(Study, result.accepted[0].study_id)
        assert study.accession_pseudonym is None or "ACC-0077" not in study.accession_pseudonym
        report = fhir.study_reports(session, [study], settings)[0]
    accession = [i for i in report["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert [(i["system"], i["value"]) for i in accession] == [
        ("https://dermascan.example/fhir/program/pacs-site/accession", "ACC-0077")
    ]
    DiagnosticReport.parse_obj(report)
