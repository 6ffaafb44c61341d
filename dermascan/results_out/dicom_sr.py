"""The AI result as DICOM, for the PACS (IHE AI Results): a TID 1500 Measurement Report in a
Comprehensive 3D SR, built with highdicom, filed in the source study.

Why TID 1500 in a Comprehensive 3D SR: TID 1500 is the template DICOM defines for measurements
and qualitative evaluations that an algorithm derives from images, with the algorithm's
identification on each group and the source image referenced by SOP Class and Instance UID —
exactly what a screening result is (a probability, a referral evaluation, the image it came
from). highdicom builds TID 1500 for the Comprehensive 3D SR IOD, which current PACS and viewers
store and render. The report is unverified (an algorithm's output); the specialist's decision
goes back later as a second, verified report.

The patient and study modules are copied from the source instance's header as received
(highdicom takes them from the evidence), so the PACS files the report with the image; the
report gets a new series. Its UIDs are derived from the study and the bundle version, so every
retry of a delivery sends the same instance and a PACS stores it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

SCHEME = "99DSCAN"  # DermaScan's private coding scheme (PS3.16 8.2: 99 prefix for private schemes)
PROBABILITY = hd.sr.CodedConcept("MALPROB", SCHEME, "Probability of malignancy")
REFERRAL = hd.sr.CodedConcept("REFERRAL", SCHEME, "Referral to a specialist")
REFERRAL_VALUES = {
    "newly_high_risk": hd.sr.CodedConcept("NEWHIGHRISK", SCHEME, "Referred: newly high risk"),
    "high_risk": hd.sr.CodedConcept("HIGHRISK", SCHEME, "Referred: high risk"),
    "changed": hd.sr.CodedConcept("CHANGED", SCHEME, "Referred: changed since last visit"),
    "not_assessable": hd.sr.CodedConcept("NOTASSESS", SCHEME, "Referred: image not assessable"),
    None: hd.sr.CodedConcept("NOTREF", SCHEME, "Not referred"),
}
# lesion follow-up: the comparison with the same lesion's previous visit
CHANGE_MEASURE = hd.sr.CodedConcept("LESCHANGE", SCHEME, "Lesion change since the previous visit")
PROBABILITY_CHANGE = hd.sr.CodedConcept("PROBCHANGE", SCHEME, "Change in probability since the previous visit")
CHANGED = hd.sr.CodedConcept("CHANGEDSLV", SCHEME, "Changed since last visit")
NEWLY_HIGH_RISK = hd.sr.CodedConcept("NEWHIGHRISK", SCHEME, "Newly high risk")
# a patient detail the score was made without (for it, the score rests on the image)
MISSING_METADATA = hd.sr.CodedConcept("MISSINGMETA", SCHEME, "Scored without patient detail")
MISSING_VALUES = {
    "age_approx": hd.sr.CodedConcept("AGE", SCHEME, "Patient age"),
    "sex": hd.sr.CodedConcept("SEX", SCHEME, "Patient sex"),
    "anatom_site_general": hd.sr.CodedConcept("SITE", SCHEME, "Anatomic site"),
}
# the differential diagnosis: the most likely class (SNOMED CT) and each class's probability
DIFFERENTIAL = hd.sr.CodedConcept("DIFFDX", SCHEME, "Most likely diagnosis (AI)")
YES, NO = codes.SCT.Yes, codes.SCT.No
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging")
UNITY = hd.sr.CodedConcept("1", "UCUM", "no units")
DEVICE_UID = "2.25.225614219371297474402476476546372812033"  # DermaScan as an observer device
SERIES_NUMBER = 9001


@dataclass(frozen=True)
class AiResult:
    probability: float | None  # None when the image could not be assessed
    threshold: float
    referral_category: str | None  # high_risk, not_assessable or None (not referred)
    bundle_version: str
    bundle_sha256: str
    # lesion follow-up: the lesion's tracking UID and name, the comparison with the previous visit
    # and the previous visit's AI report (study, series, instance UIDs)
    lesion_uid: str | None = None
    lesion_name: str | None = None
    change_measure: float | None = None
    probability_change: float | None = None
    changed: bool | None = None
    newly_high_risk: bool | None = None
    previous_report: tuple[str, str, str] | None = None
    missing_fields: tuple[str, ...] = ()
    differential: tuple[dict, ...] = ()  # {diagnosis, label, snomed, probability}, most likely first


# attributes of the patient and general study modules that are type 2 (present, possibly empty):
# a modality that left one out still gets its results back, with it empty
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def complete(source: Dataset) -> Dataset:
    """A copy of the source header with the type 2 attributes the reports carry over present."""
    out = Dataset()
    out.update(source)
    for keyword in TYPE_2:
        if keyword not in out:
            setattr(out, keyword, "")
    return out


def object_uids(source: Dataset, *parts: str) -> tuple[str, str]:
    """(series, instance) UIDs of an object made for ``source``: derived from its study and
    instance and ``parts``, so every retry of a delivery sends the same instance."""
    seed = [source.StudyInstanceUID, source.SOPInstanceUID, *parts]
    return generate_uid(entropy_srcs=[*seed, "series"]), generate_uid(entropy_srcs=[*seed, "instance"])


def _document(source: Dataset, evidence, report, series_number: int, uid_parts, description: str, **flags):
    """A Comprehensive 3D SR of ``report`` in the source study, in a series of its own."""
    series_uid, instance_uid = object_uids(source, *uid_parts)
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=instance_uid, instance_number=1, manufacturer="DermaScan", is_complete=True,
        series_description=description, **flags,
    )  # fmt: skip


def ai_result_report(source: Dataset, result: AiResult) -> hd.sr.Comprehensive3DSR:
    """The unverified AI result for ``source`` (its header is enough: no pixel data needed)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name="DermaScan NASNetMobile image + metadata fusion",
        version=result.bundle_version,
        parameters=[f"bundle sha256 {result.bundle_sha256}", f"referral threshold {result.threshold:.6f}"],
    )
    measurements = []
    if result.probability is not None:
        measurements.append(
            hd.sr.Measurement(name=PROBABILITY, value=float(result.probability), unit=UNITY, algorithm_id=algorithm)
        )
    evaluations = [hd.sr.QualitativeEvaluation(REFERRAL, REFERRAL_VALUES[result.referral_category])]
    for name, value in ((CHANGE_MEASURE, result.change_measure), (PROBABILITY_CHANGE, result.probability_change)):
        if value is not None:
            measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=UNITY, algorithm_id=algorithm))
    for name, flag in ((CHANGED, result.changed), (NEWLY_HIGH_RISK, result.newly_high_risk)):
        if flag is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(name, YES if flag else NO))
    if result.differential:
        top = result.differential[0]
        evaluations.append(
            hd.sr.QualitativeEvaluation(DIFFERENTIAL, hd.sr.CodedConcept(top["snomed"], "SCT", top["label"][:64]))
        )
        for row in result.differential:
            name = hd.sr.CodedConcept(f"DXP-{row['diagnosis'].upper()}", SCHEME, f"Probability of {row['label']}"[:64])
            measurements.append(
                hd.sr.Measurement(name=name, value=float(row["probability"]), unit=UNITY, algorithm_id=algorithm)
            )
    for field in result.missing_fields:
        value = MISSING_VALUES.get(field, hd.sr.CodedConcept(field.upper()[:16], SCHEME, field))
        evaluations.append(hd.sr.QualitativeEvaluation(MISSING_METADATA, value))
    # a followed lesion keeps one tracking UID across its visits (TID 1500's lesion tracking)
    tracking = (
        hd.sr.TrackingIdentifier(uid=result.lesion_uid, identifier=result.lesion_name or "lesion")
        if result.lesion_uid
        else hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[source.SOPInstanceUID, "lesion"]), identifier="lesion")
    )  # fmt: skip
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )  # fmt: skip
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_UID, name="DermaScan", manufacturer_name="DermaScan", model_name=result.bundle_version
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group],
    )
    document = _document(source, [source], report, SERIES_NUMBER, [result.bundle_version, "sr"],
                         "DermaScan AI result (not a medical device)")  # fmt: skip
    if result.previous_report is not None:
        document.PertinentOtherEvidenceSequence = [_reference(*result.previous_report)]
    return document


def _reference(study_uid: str, series_uid: str, instance_uid: str) -> Dataset:
    """The previous visit's AI report, as a Hierarchical SOP Instance Reference (PS3.3 C.17.2.1)."""
    instance = Dataset()
    instance.ReferencedSOPClassUID = Comprehensive3DSRStorage
    instance.ReferencedSOPInstanceUID = instance_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid
    series.ReferencedSOPSequence = [instance]
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = [series]
    return study


def ai_report_uids(source: Dataset, bundle_version: str) -> tuple[str, str, str]:
    """(study, series, instance) UIDs of the AI report made for ``source`` by ``bundle_version``."""
    series, instance = object_uids(source, bundle_version, "sr")
    return source.StudyInstanceUID, series, instance


HEATMAP_SERIES_NUMBER = 9002
DECISION_SERIES_NUMBER = 9003
DECISION = hd.sr.CodedConcept("DECISION", SCHEME, "Specialist decision")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def heatmap_capture(source: Dataset, overlay_rgb, bundle_version: str) -> hd.sc.SCImage:
    """The heat map (Grad-CAM × HiResCAM, ``model.inference.gradcam``) burned into the lesion image,
    as a Secondary Capture in the source study (a new series, the source image referenced).

    Why a Secondary Capture with the overlay burned in rather than a Parametric Map: every PACS
    viewer displays an RGB Secondary Capture as it is, while Parametric Maps need a viewer that
    fuses a float map onto its source frame (few dermatology viewers do), and a dermoscopy
    photograph has no patient coordinate system to register one in. The price: the pixels are
    a picture for people, not data to compute on — which is all a heat map is for here.
    """
    series_uid, instance_uid = object_uids(source, bundle_version, "heatmap")
    orientation = list(source.get("PatientOrientation") or [])
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay_rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom wants an orientation for a patient image; a photograph has none, so the
        # source's is copied when it has one and the (type 2) attribute is left empty otherwise
        patient_orientation=tuple(orientation) if len(orientation) == 2 else ("L", "F"),
        series_instance_uid=series_uid,
        series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="DermaScan",
    )
    if len(orientation) != 2:
        capture.PatientOrientation = ""
    capture.Laterality = source.get("Laterality") or ""  # type 2C (a paired body part): as received, else unknown
    capture.BurnedInAnnotation = "YES"
    capture.SeriesDescription = "DermaScan heat map (Grad-CAM x HiResCAM, not a medical device)"
    capture.ImageComments = f"Grad-CAM x HiResCAM of bundle {bundle_version}: warm colours weighed most in the score"
    derivation = Dataset()
    derivation.ReferencedSOPClassUID = source.SOPClassUID
    derivation.ReferencedSOPInstanceUID = source.SOPInstanceUID
    capture.SourceImageSequence = [derivation]
    return capture


DECISION_CODES = {  # code values are at most 16 characters (SH)
    "urgent_in_person_review": "URGENT",
    "biopsy_or_excision": "BIOPSY",
    "routine_follow_up": "FOLLOWUP",
    "benign_no_action": "BENIGN",
    "image_quality_insufficient": "POORQUALITY",
}


@dataclass(frozen=True)
class SpecialistDecision:
    decision: str  # the Decision value
    label: str  # how people read it
    note: str | None
    specialist: str  # the verifying observer's name, "Family^Given" or a login
    organization: str
    decided_at: object  # datetime (UTC)


def decision_report(
    source: Dataset, ai_report: Dataset, decision: SpecialistDecision, previous: Dataset | None = None, version: int = 0
) -> hd.sr.Comprehensive3DSR:
    """The specialist's decision on a referred study: a verified TID 1500 report by that
    specialist (name and time in the verifying observer fields) that refers to the AI result
    (listed in its evidence) and to the source image. An amended decision is a new report that
    names the one it supersedes (``previous``) in its Predecessor Documents Sequence; each version
    (``version``: 0 for the first decision, n after n amendments) has UIDs of its own."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=decision.specialist),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[source.SOPInstanceUID, "lesion"]), identifier="lesion"),
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(DECISION, hd.sr.CodedConcept(DECISION_CODES[decision.decision], SCHEME, decision.label))
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)],
    )  # fmt: skip
    if decision.note:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(name=COMMENT, value=decision.note[:1024], relationship_type="CONTAINS")
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=IMAGING_PROCEDURE,
        imaging_measurements=[group],
    )
    sr = _document(
        source, [source, ai_report], report, DECISION_SERIES_NUMBER,
        ["decision", decision.decided_at.strftime("%Y%m%d%H%M%S"), *([f"amendment-{version}"] if version else [])],
        "DermaScan specialist decision",
        is_final=True, is_verified=True, verifying_observer_name=decision.specialist,
        verifying_organization=decision.organization, previous_versions=[previous] if previous is not None else None,
    )  # fmt: skip
    sr.VerifyingObserverSequence[0].VerificationDateTime = decision.decided_at.strftime("%Y%m%d%H%M%S+0000")
    return sr


VL_PHOTOGRAPHIC_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"


def synthetic_source(key: str, pseudonym: str | None, sex: str | None, age: float | None, created_at) -> Dataset:
    """The DICOM identity of a study that came from the portal or the REST API (item 5), for a
    program that wants its results in the PACS too: UIDs made from ``key`` (stable: the same on
    every retry) and a minimal patient module from the pseudonym — DermaScan holds no name, birth
    date or medical record number for these studies, so the PACS files them under the pseudonym.
    The reports refer to the lesion image by these UIDs; the image itself stays in DermaScan."""
    ds = Dataset()
    ds.PatientID = (pseudonym or f"DERMASCAN-{key}")[:64]
    ds.IssuerOfPatientID = "DermaScan pseudonym"
    ds.PatientName = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = {"male": "M", "female": "F"}.get((sex or "").lower(), "")
    if isinstance(age, int | float) and 0 <= age < 1000:
        ds.PatientAge = f"{min(int(age), 999):03d}Y"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["dermascan-study", key])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["dermascan-series", key])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["dermascan-image", key])
    ds.SOPClassUID = VL_PHOTOGRAPHIC_IMAGE
    ds.Modality = "XC"
    ds.StudyID = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = created_at.strftime("%Y%m%d")
    ds.StudyTime = created_at.strftime("%H%M%S")
    ds.StudyDescription = "DermaScan lesion screening"
    return ds
