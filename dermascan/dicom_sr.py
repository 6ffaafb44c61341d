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
from pydicom.uid import generate_uid

SCHEME = "99DSCAN"  # DermaScan's private coding scheme (PS3.16 8.2: 99 prefix for private schemes)
PROBABILITY = hd.sr.CodedConcept("MALPROB", SCHEME, "Probability of malignancy")
REFERRAL = hd.sr.CodedConcept("REFERRAL", SCHEME, "Referral to a specialist")
REFERRAL_VALUES = {
    "high_risk": hd.sr.CodedConcept("HIGHRISK", SCHEME, "Referred: high risk"),
    "not_assessable": hd.sr.CodedConcept("NOTASSESS", SCHEME, "Referred: image not assessable"),
    None: hd.sr.CodedConcept("NOTREF", SCHEME, "Not referred"),
}
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


def uids(study_instance_uid: str, sop_instance_uid: str, bundle_version: str) -> tuple[str, str]:
    """(series, instance) UIDs of the report: the same on every retry of the same result."""
    seed = [study_instance_uid, sop_instance_uid, bundle_version]
    return generate_uid(entropy_srcs=[*seed, "series"]), generate_uid(entropy_srcs=[*seed, "sr"])


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
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[source.SOPInstanceUID, "lesion"]), identifier="lesion"),
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(REFERRAL, REFERRAL_VALUES[result.referral_category])],
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
    series_uid, instance_uid = uids(source.StudyInstanceUID, source.SOPInstanceUID, result.bundle_version)
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer="DermaScan",
        is_complete=True,
        series_description="DermaScan AI result (not a medical device)",
    )
