"""The AI result as a DICOM Structured Report (issue 13, item 1, the report itself): TID 1500 in a
Comprehensive 3D SR, in the source study with the patient and study modules as received, a new
series, the source image referenced, the probability, referral and algorithm identification;
valid for dciodvfy (Debian's dicom3tools); the same UIDs on every rebuild (idempotent delivery)."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from dermascan.ingest.dicom import VL_PHOTOGRAPHIC
from dermascan.results_out.dicom_sr import PROBABILITY, REFERRAL, AiResult, ai_result_report
from tests.dicom_factory import content_items, dciodvfy_errors, make_instance
from tests.ham_files import ham_images, ham_rows


@pytest.mark.parametrize("assessable", [True, False])
def test_the_ai_result_report_is_valid_and_filed_with_its_image(ham_dir, tmp_path, assessable):
    jpeg = next(iter(ham_images(ham_dir, ham_rows(ham_dir, 1).isic_id).values()))
    source = make_instance(jpeg, sop_class=VL_PHOTOGRAPHIC, patient_id="MRN-SR", age=61, sex="male")
    del source.PixelData  # the kept header is all the report needs
    result = AiResult(0.8312 if assessable else None, 0.0616, "high_risk" if assessable else "not_assessable",
                      "ham10000-test", "ab" * 32)  # fmt: skip
    report = ai_result_report(source, result)
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)

    errors = dciodvfy_errors(path)
    assert not errors, errors

    sr = dcmread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
    for keyword in ("PatientID", "PatientName", "PatientSex", "StudyDate", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    items = list(content_items(sr))
    references = [r.ReferencedSOPInstanceUID for i in items for r in i.get("ReferencedSOPSequence", [])]
    assert source.SOPInstanceUID in references
    numbers = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == PROBABILITY.value]
    assert [float(n.MeasuredValueSequence[0].NumericValue) for n in numbers] == ([0.8312] if assessable else [])
    referral = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == REFERRAL.value]
    assert referral[0].ConceptCodeSequence[0].CodeValue == ("HIGHRISK" if assessable else "NOTASSESS")
    texts = " ".join(str(i.get("TextValue", "")) for i in items)
    assert "ham10000-test" in texts and "ab" * 32 in texts  # the algorithm's version and bundle sha256
    # rebuilt (a retried delivery): the same instance, so a PACS stores it once
    again = ai_result_report(source, result)
    assert (again.SeriesInstanceUID, again.SOPInstanceUID) == (sr.SeriesInstanceUID, sr.SOPInstanceUID)


def test_the_header_is_kept_encrypted_at_ingest_and_the_report_is_built_from_it(tmp_path, ham_dir):
    """From a STOW-RS/C-STORE parse to the report: the header as received is stored encrypted
    (patient identifiers never in clear on disk) and is enough to build the report."""
    import io

    from dermascan.config import Settings
    from dermascan.infra import migrate
    from dermascan.infra.blobs import BlobStore
    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study
    from dermascan.ingest.dicom import parse_dataset
    from dermascan.intake.submission import SubmitStudies
    from dermascan.security import keys
    from dermascan.security.identity import get_or_create_program
    from tests.dicom_factory import to_bytes

    settings = Settings.from_env(env={}, data_dir=tmp_path / "var", secret_key="sr-secret")
    migrate.upgrade(settings.database_url)
    jpeg = next(iter(ham_images(ham_dir, ham_rows(ham_dir, 1).isic_id).values()))
    source = make_instance(jpeg, patient_id="MRN-KEPT")
    received = dcmread(io.BytesIO(to_bytes(source)))
    parsed = parse_dataset(received, settings)
    assert "PixelData" in received  # keeping the header leaves the received dataset whole
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "pacs").id
        study_id = SubmitStudies(settings, program_id, [parsed.study], source="dicom").run(session).new_study_ids[0]
    with session_factory(settings.database_url)() as session:
        digest = session.get(Study, study_id).dicom_header_sha256
    stored = BlobStore(settings.blob_dir).get(digest)
    assert b"MRN-KEPT" not in stored and b"Test^Patient" not in stored  # encrypted at rest
    header = dcmread(io.BytesIO(keys.header_cipher(settings.secret_key).decrypt(stored)))
    assert "PixelData" not in header and header.PatientID == "MRN-KEPT"
    report = ai_result_report(header, AiResult(0.2, 0.0616, None, "v", "cd" * 32))
    assert report.PatientID == "MRN-KEPT" and report.StudyInstanceUID == source.StudyInstanceUID


def test_the_heat_map_and_the_specialists_verified_report_are_valid(ham_dir, tmp_path):
    """Item 1's heat map (a Secondary Capture with the overlay burned in) and item 2's verified
    report of the specialist's decision, which refers to the AI result; both in the source study."""
    import datetime as dt

    import numpy as np

    from dermascan.results_out.dicom_sr import DECISION, SpecialistDecision, decision_report, heatmap_capture

    jpeg = next(iter(ham_images(ham_dir, ham_rows(ham_dir, 1).isic_id).values()))
    source = make_instance(jpeg, patient_id="MRN-MAP", age=48, sex="female")
    del source.PixelData
    overlay = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    capture = heatmap_capture(source, overlay, "v1")
    capture.save_as(tmp_path / "map.dcm", enforce_file_format=True)
    assert not dciodvfy_errors(tmp_path / "map.dcm")
    sc = dcmread(tmp_path / "map.dcm")
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.PatientID == "MRN-MAP"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (sc.Rows, sc.Columns, sc.SamplesPerPixel) == (96, 128, 3)
    assert np.array_equal(sc.pixel_array, overlay)
    assert heatmap_capture(source, overlay, "v1").SOPInstanceUID == sc.SOPInstanceUID  # stable on retry

    ai = ai_result_report(source, AiResult(0.9, 0.06, "high_risk", "v1", "ab" * 32))
    decided_at = dt.datetime(2026, 11, 29, 10, 30, tzinfo=dt.UTC)
    decision = SpecialistDecision("biopsy_or_excision", "Biopsy or excision", "Irregular network, 7 mm.",
                                  "House^Gregory", "Hospital B", decided_at)  # fmt: skip
    report = decision_report(source, ai, decision)
    report.save_as(tmp_path / "decision.dcm", enforce_file_format=True)
    assert not dciodvfy_errors(tmp_path / "decision.dcm")
    sr = dcmread(tmp_path / "decision.dcm")
    assert sr.VerificationFlag == "VERIFIED" and sr.StudyInstanceUID == source.StudyInstanceUID
    observer = sr.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerificationDateTime[:12]) == (
        "House^Gregory",
        "202611291030",
    )
    evidence = [i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]  # fmt: skip
    assert ai.SOPInstanceUID in evidence and source.SOPInstanceUID in evidence  # refers to the AI result
    items = list(content_items(sr))
    codes_ = [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == DECISION.value]  # fmt: skip
    assert codes_ == ["BIOPSY"]
    assert "Irregular network, 7 mm." in [str(i.get("TextValue", "")) for i in items]


def test_a_header_missing_type_2_attributes_still_gets_valid_reports(ham_dir, tmp_path):
    """Modalities leave out type 2 attributes (patient name, study ID, accession number…): the
    results still go back, with them empty, and stay valid."""
    from dermascan.results_out.dicom_sr import complete

    jpeg = next(iter(ham_images(ham_dir, ham_rows(ham_dir, 1).isic_id).values()))
    source = make_instance(jpeg)
    del source.PixelData
    for keyword in (
        "PatientName",
        "StudyID",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyTime",
        "PatientBirthDate",
    ):
        if keyword in source:
            delattr(source, keyword)
    report = ai_result_report(complete(source), AiResult(0.3, 0.06, None, "v", "ab" * 32))
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    assert not dciodvfy_errors(tmp_path / "sr.dcm")
    assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientName == ""
    assert "PatientName" not in source  # the header as received is left as it was
