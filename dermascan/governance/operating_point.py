"""What a referral threshold means on the bundle's validation data: sensitivity and
specificity read from the ROC table stored in the bundle's manifest (the shipped ensemble's
calibrated scores on its held-out calibration set; out-of-fold predictions in older bundles),
and the referrals to expect per 1,000 studies at a prevalence."""

from __future__ import annotations

import bisect


def roc_table(manifest: dict) -> list[dict]:
    return (manifest.get("metrics") or {}).get("roc_table") or []


def at_threshold(manifest: dict, threshold: float) -> dict | None:
    """Sensitivity/specificity at ``threshold`` (score >= threshold refers), from the table of
    (threshold, sensitivity, specificity) sorted by threshold; None when the bundle has none."""
    table = sorted(roc_table(manifest), key=lambda r: r["threshold"])
    if not table:
        return None
    keys = [r["threshold"] for r in table]
    i = bisect.bisect_left(keys, threshold)
    # the first tabulated threshold at or above the requested one gives the same calls on the
    # validation data when the table holds every distinct score; otherwise it is the nearest above
    row = (
        table[min(i, len(table) - 1)]
        if i < len(table)
        else {"threshold": threshold, "sensitivity": 0.0, "specificity": 1.0}
    )
    return {
        "threshold": threshold,
        "sensitivity": row["sensitivity"],
        "specificity": row["specificity"],
        "n": (
            (manifest.get("metrics") or {}).get("calibration_set") or (manifest.get("metrics") or {}).get("oof") or {}
        ).get("n"),
        "data": (manifest.get("metrics") or {}).get("data"),
    }


def validation_prevalence(manifest: dict) -> float | None:
    """The malignant share of the data the ROC table comes from."""
    metrics = manifest.get("metrics") or {}
    calibration = manifest.get("calibration") or {}
    if calibration.get("prevalence"):
        return float(calibration["prevalence"])
    block = metrics.get("calibration_set") or metrics.get("oof") or {}
    if block.get("n") and block.get("positives") is not None:
        return block["positives"] / block["n"]
    return None


def referrals_per_1000(point: dict | None, prevalence: float | None) -> float | None:
    """Expected referrals per 1,000 studies: the malignant ones caught plus the benign ones
    called positive, at ``prevalence``."""
    if not point or prevalence is None:
        return None
    return 1000.0 * (prevalence * point["sensitivity"] + (1 - prevalence) * (1 - point["specificity"]))


def roc_curve(manifest: dict) -> list[tuple[float, float]]:
    """(false-positive rate, sensitivity) points of the stored ROC table, for drawing."""
    table = sorted(roc_table(manifest), key=lambda r: r["threshold"], reverse=True)
    return [(0.0, 0.0)] + [(1 - r["specificity"], r["sensitivity"]) for r in table] + [(1.0, 1.0)]


class PrevalenceError(ValueError):
    """An expected prevalence outside (0, 0.5]."""


def set_expected_prevalence(session, program, value: float | None, actor=None) -> None:
    """Set (or clear, with None) a program's expected malignant share, audited in the caller's
    transaction. The displayed probability is re-weighed to it; referral decisions do not change."""
    from dermascan.security.audit import SYSTEM

    if value is not None and not 0 < value <= 0.5:
        raise PrevalenceError(f"expected prevalence must lie in (0, 0.5], got {value}")
    old = program.expected_prevalence
    program.expected_prevalence = value
    (actor or SYSTEM).record(session, "program_prevalence_set", object_type="program", object_id=program.id,
                             detail={"program": program.name, "from": old, "to": value})  # fmt: skip


class ThresholdError(ValueError):
    """A referral threshold outside (0, 1)."""


def set_threshold(session, bundle, value: float, actor=None) -> dict:
    """Move a bundle's referral threshold (it applies to studies scored from now on), audited with
    the sensitivity and specificity its validation shows there. Returns that operating point."""
    from dermascan.infra.schema import utcnow
    from dermascan.security.audit import SYSTEM

    actor = actor or SYSTEM
    value = float(value)
    if not 0 < value < 1:
        raise ThresholdError(f"a referral threshold lies strictly between 0 and 1, not {value}")
    point = at_threshold(bundle.manifest, value)
    old = bundle.threshold
    bundle.threshold, bundle.threshold_changed_at, bundle.threshold_changed_by_id = value, utcnow(), actor.user_id
    actor.record(session, "threshold_changed", object_type="bundle", object_id=bundle.version,
                 detail={"from": old, "to": value, "at_validation": point})  # fmt: skip
    return point
