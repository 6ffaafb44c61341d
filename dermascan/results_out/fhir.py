"""Results for the EHR as FHIR R4: one DiagnosticReport per study, with its Observations
(malignancy probability, referral, the specialist's decision once there is one), the
ImagingStudy it came from (by Study Instance UID, when it arrived by DICOM) and the algorithm as
a Device, all ``contained`` so the report stands alone; a batch is a ``collection`` Bundle.

Plain dictionaries, built from the same result rows as the JSON and CSV exports; the tests
validate them with fhir.resources' R4 models. The patient is identified only by DermaScan's
keyed pseudonym (never the identifier the hospital sent).
"""

from __future__ import annotations

import logging
import uuid

from dermascan.infra.schema import DECISION_LABELS, Decision, Referral, Study
from dermascan.screening import referral_policy

log = logging.getLogger(__name__)
SYSTEM = "https://dermascan.example/fhir"  # DermaScan's own code systems and identifiers
PSEUDONYM_SYSTEM = f"{SYSTEM}/patient-pseudonym"
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, SYSTEM)


def _code(system: str, code: str, display: str) -> dict:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _observation(ident: str, code: dict, subject: dict, effective: str | None, **value) -> dict:
    resource = {
        "resourceType": "Observation",
        "id": ident,
        "status": "final",
        "category": [_code("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")],
        "code": code,
        "subject": subject,
        "device": {"reference": "#algorithm"},
        **value,
    }
    if effective:
        resource["effectiveDateTime"] = effective
    return resource


def sender_identifiers(study: Study, program: str, settings=None, accession: str | None = None) -> list[dict]:
    """The sender's own identifiers of a study, under the installation's identifier systems: its
    reference (placer) and, for DICOM, its accession number."""
    from urllib.parse import quote

    reference_system = getattr(settings, "fhir_reference_system", None) or f"{SYSTEM}/program/{{program}}/reference"
    accession_system = getattr(settings, "fhir_accession_system", None) or f"{SYSTEM}/program/{{program}}/accession"
    name = quote(program, safe="")
    out = []
    if study.external_id:
        out.append({
            "use": "usual", "type": _code("http://terminology.hl7.org/CodeSystem/v2-0203", "PLAC", "Placer Identifier"),
            "system": reference_system.replace("{program}", name), "value": study.external_id,
        })  # fmt: skip
    if accession:
        out.append({
            "type": _code("http://terminology.hl7.org/CodeSystem/v2-0203", "ACSN", "Accession ID"),
            "system": accession_system.replace("{program}", name), "value": accession,
        })  # fmt: skip
    return out


def diagnostic_report(
    row: dict, study: Study, referral: Referral | None, bundle: dict | None, identifiers: list[dict] | None = None
) -> dict:
    """The DiagnosticReport of one study's result ``row`` (``reports.study_row``), with the
    sender's own ``identifiers`` (:func:`sender_identifiers`) beside DermaScan's."""
    subject = (
        {
            "identifier": {"system": PSEUDONYM_SYSTEM, "value": study.patient_pseudonym},
            "display": "pseudonymised patient",
        }
        if study.patient_pseudonym
        else {"display": "patient not identified"}
    )
    effective = row.get("finished_at")
    contained = [_device(row, bundle)]
    if row.get("probability") is not None:
        contained.append(
            _observation(
                "probability", _code(SYSTEM, "malignancy-probability", "Probability of malignancy (calibrated)"),
                subject, effective,
                valueQuantity={"value": row["probability"], "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
                referenceRange=[{"high": {"value": row["threshold"], "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
                                 "text": "referral threshold"}],
            )
        )  # fmt: skip
    if row.get("referral_category"):
        label = {c: f"Referred: {text}" for c, text in referral_policy.CATEGORY_LABELS.items()}
        contained.append(
            _observation(
                "referral", _code(SYSTEM, "referral", "Referral to a specialist"), subject, effective,
                valueCodeableConcept=_code(SYSTEM, row["referral_category"], label.get(row["referral_category"], row["referral_category"])),
            )
        )  # fmt: skip
    elif row.get("referred") is False:
        contained.append(
            _observation("referral", _code(SYSTEM, "referral", "Referral to a specialist"), subject, effective,
                         valueCodeableConcept=_code(SYSTEM, "not-referred", "Not referred"))
        )  # fmt: skip
    if row.get("previous_study_id") is not None:
        contained.append(_change_observation(row, subject, effective))
    if row.get("missing_fields"):
        contained.append(
            _observation(
                "missing-metadata", _code(SYSTEM, "missing-metadata", "Patient details the score was made without"),
                subject, effective, valueString=", ".join(row["missing_fields"]),
                note=[{"text": row["missing_fields_note"]}],
            )
        )  # fmt: skip
    if referral is not None and referral.decision is not None:
        decision = Decision(referral.decision)
        observation = _observation(
            "decision", _code(SYSTEM, "specialist-decision", "Specialist's decision"), subject,
            referral.decided_at.isoformat() if referral.decided_at else effective,
            valueCodeableConcept=_code(SYSTEM, decision.value, DECISION_LABELS[decision]),
        )  # fmt: skip
        observation.pop("device")
        if referral.amendments:  # amended: the decision in force, and why it changed
            last = referral.amendments[-1]
            observation["status"] = "amended"
            observation.setdefault("note", []).append({"text": (
                f"Amended {last.amended_at:%Y-%m-%d %H:%M} UTC (was: {DECISION_LABELS[Decision(last.decision)]}): {last.reason}"
            )})  # fmt: skip
        if referral.decided_by is not None:
            observation["performer"] = [{"display": referral.decided_by.username}]
        if referral.note:
            observation.setdefault("note", []).insert(0, {"text": referral.note})
        contained.append(observation)
    results = [{"reference": f"#{r['id']}"} for r in contained if r["resourceType"] == "Observation"]
    report = {
        "resourceType": "DiagnosticReport",
        "id": f"study-{row['study_id']}",
        "identifier": [{"system": f"{SYSTEM}/study", "value": str(row["study_id"])}, *(identifiers or [])],
        "status": _status(row, referral),
        "category": [_code("http://terminology.hl7.org/CodeSystem/v2-0074", "IMG", "Diagnostic Imaging")],
        "code": _code(SYSTEM, "skin-lesion-malignancy-screening", "Skin lesion malignancy screening (AI)"),
        "subject": subject,
        "performer": [{"reference": "#algorithm", "display": "DermaScan"}],
        "result": results,
        "contained": contained,
    }
    if effective:
        report["effectiveDateTime"] = effective
        report["issued"] = effective
    if study.study_instance_uid:
        contained.append(
            {
                "resourceType": "ImagingStudy",
                "id": "imaging-study",
                "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"}],
                "status": "available",
                "subject": subject if "identifier" in subject else {"display": subject["display"]},
                "numberOfInstances": 1,
            }
        )
        report["imagingStudy"] = [{"reference": "#imaging-study"}]
    if row.get("previous_study_id") is not None:
        # the previous report of the same lesion (a logical reference: its identifier)
        report["extension"] = [{
            "url": "http://hl7.org/fhir/StructureDefinition/workflow-supportingInfo",
            "valueReference": {
                "type": "DiagnosticReport",
                "identifier": {"system": f"{SYSTEM}/study", "value": str(row["previous_study_id"])},
                "display": "previous report of the same lesion",
            },
        }]  # fmt: skip
    report["conclusion"] = _conclusion(row, referral)
    if row.get("differential"):
        # the most likely diagnosis, coded in SNOMED CT; each class's probability in an Observation
        top = row["differential"][0]
        report["conclusionCode"] = [_code("http://snomed.info/sct", top["snomed"], top["label"])]
        contained.append(_differential_observation(row["differential"], subject, effective))
        report["result"].append({"reference": "#differential"})
    return report


def _change_observation(row: dict, subject: dict, effective: str | None) -> dict:
    """What changed since the lesion's previous visit: the change measure (units of a typical
    unchanged same-lesion pair), its percentile among unchanged pairs, the change in probability,
    and the two follow-up verdicts."""
    components = []
    if row.get("probability_change") is not None:
        components.append({"code": _code(SYSTEM, "probability-change", "Change in probability since the previous visit"),
                           "valueQuantity": {"value": row["probability_change"], "unit": "probability",
                                             "system": "http://unitsofmeasure.org", "code": "1"}})  # fmt: skip
    if row.get("change_percentile") is not None:
        components.append({"code": _code(SYSTEM, "change-percentile", "Share of unchanged same-lesion pairs changing less"),
                           "valueQuantity": {"value": row["change_percentile"], "unit": "fraction",
                                             "system": "http://unitsofmeasure.org", "code": "1"}})  # fmt: skip
    for key, code, text in (("changed_since_last_visit", "changed-since-last-visit", "Changed since last visit"),
                            ("newly_high_risk", "newly-high-risk", "Newly high risk (not referred at the last visit)")):  # fmt: skip
        if row.get(key) is not None:
            components.append({"code": _code(SYSTEM, code, text), "valueBoolean": bool(row[key])})
    value = (
        {"valueQuantity": {"value": row["change_measure"], "unit": "unchanged-pair units"}}
        if row.get("change_measure") is not None
        else {"dataAbsentReason": _code("http://terminology.hl7.org/CodeSystem/data-absent-reason", "not-applicable",
                                        "Not applicable")}
    )  # fmt: skip
    observation = _observation(
        "change-since-last-visit", _code(SYSTEM, "lesion-change", "Lesion change since the previous visit"),
        subject, effective, **value,
    )  # fmt: skip
    observation["focus"] = [{"identifier": {"system": f"{SYSTEM}/lesion", "value": str(row["dermascan_lesion_id"])},
                             "display": "followed lesion"}]  # fmt: skip
    if components:
        observation["component"] = components
    return observation


def _device(row: dict, bundle: dict | None) -> dict:
    device = {
        "resourceType": "Device",
        "id": "algorithm",
        "deviceName": [{"name": "DermaScan skin-lesion screening model", "type": "model-name"}],
        "type": _code(SYSTEM, "ai-algorithm", "AI algorithm (not a medical device)"),
    }
    version = row.get("bundle_version")
    if version:
        device["version"] = [{"value": version}]
    if bundle and bundle.get("sha256"):
        device["identifier"] = [{"system": f"{SYSTEM}/bundle-sha256", "value": bundle["sha256"]}]
    return device


def _status(row: dict, referral: Referral | None) -> str:
    if row.get("status") != "done":
        return "registered" if row.get("status") in ("queued", "processing") else "cancelled"
    if referral is not None and referral.decision is None:
        return "preliminary"  # awaiting the specialist
    return "amended" if referral is not None else "final"


def _differential_observation(differential: list[dict], subject: dict, effective: str | None) -> dict:
    """The differential diagnosis: one component per class (SNOMED CT), its probability."""
    observation = _observation(
        "differential", _code(SYSTEM, "differential-diagnosis", "Differential diagnosis (AI)"), subject, effective,
        valueCodeableConcept=_code("http://snomed.info/sct", differential[0]["snomed"], differential[0]["label"]),
    )  # fmt: skip
    observation["component"] = [
        {
            "code": _code("http://snomed.info/sct", row["snomed"], row["label"]),
            "valueQuantity": {"value": row["probability"], "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
        }
        for row in differential
    ]  # fmt: skip
    return observation


def _conclusion(row: dict, referral: Referral | None) -> str:
    if row.get("status") != "done":
        return f"Not scored ({row.get('status')})."
    if row.get("assessable") is False:
        text = f"The image could not be assessed ({row.get('not_assessable_reason')}); referred for a person to check."
    else:
        verdict = "at or above" if row["probability"] >= row["threshold"] else "below"
        reason = f" ({row['referral_reason']})" if row.get("referral_reason") else ""
        text = (
            f"Probability of malignancy {row['probability']:.3f}, {verdict} the referral threshold "
            f"{row['threshold']:.3f}: {'referred to a specialist' + reason if row.get('referred') else 'not referred'}."
        )
    if row.get("previous_study_id") is not None:
        text += f" Previous visit of the same lesion: study {row['previous_study_id']}"
        if row.get("probability_change") is not None:
            text += f", probability change {row['probability_change']:+.3f}"
        if row.get("change_measure") is not None:
            text += (
                f", change measure {row['change_measure']:.2f} ({'changed' if row.get('changed_since_last_visit') else 'not changed'}"
                " beyond the follow-up threshold)"
            )
        text += "."
    if row.get("missing_fields_note"):
        text += " " + row["missing_fields_note"]
    if row.get("differential"):
        top = row["differential"][0]
        text += f" Most likely: {top['label']} ({top['probability']:.0%})."
    if referral is not None and referral.decision is not None:
        text += f" Specialist's decision: {DECISION_LABELS[Decision(referral.decision)]}."
        if referral.amendments:
            last = referral.amendments[-1]
            text += f" (Amended from {DECISION_LABELS[Decision(last.decision)]}: {last.reason}.)"
    return text


def collection(reports: list[dict]) -> dict:
    """A batch's reports as a FHIR ``collection`` Bundle."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(NAMESPACE, r['id'])}", "resource": r} for r in reports],
    }


def _accession(settings, study: Study, blobs) -> str | None:
    """A DICOM study's accession number, from its header as received (kept encrypted)."""
    if settings is None or not study.dicom_header_sha256:
        return None
    from dermascan.results_out.objects import source_header

    try:
        value = str(source_header(settings, study, blobs).get("AccessionNumber", "") or "").strip()
    except Exception as exc:  # a header that cannot be read leaves the report without it
        log.warning("study %s: its DICOM header could not be read for the accession number: %s", study.id, exc)
        return None
    return value or None


def study_reports(session, studies: list[Study], settings=None) -> list[dict]:
    """The DiagnosticReports of ``studies``, from the same rows as the other exports; with
    ``settings``, the sender's identifiers come under the installation's systems, the accession
    number of a DICOM study included."""
    from sqlalchemy import select

    from dermascan.infra.blobs import blob_store
    from dermascan.infra.schema import ModelBundle, Program
    from dermascan.screening import reports

    ids = [s.id for s in studies]
    predictions = reports.latest_predictions(session, ids)
    categories = reports.referral_categories(session, ids)
    prevalence = reports.Prevalence(session)
    referrals = {r.study_id: r for r in session.scalars(select(Referral).where(Referral.study_id.in_(ids)))}
    versions = {p.bundle_version for p in predictions.values()}
    bundles = {
        b.version: {"sha256": b.sha256}
        for b in session.scalars(select(ModelBundle).where(ModelBundle.version.in_(versions)))
    }
    names = {
        p.id: p.name for p in session.scalars(select(Program).where(Program.id.in_({s.program_id for s in studies})))
    }
    blobs = blob_store(settings) if settings is not None and any(s.dicom_header_sha256 for s in studies) else None
    out = []
    for study in studies:
        prediction = predictions.get(study.id)
        row = reports.study_row(study, prediction, categories.get(study.id), prevalence.get(study, prediction),
                                referrals.get(study.id))  # fmt: skip
        identifiers = sender_identifiers(
            study, names.get(study.program_id, ""), settings, _accession(settings, study, blobs)
        )
        out.append(
            diagnostic_report(row, study, referrals.get(study.id), bundles.get(row["bundle_version"]), identifiers)
        )
    return out
