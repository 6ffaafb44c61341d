"""What a referral threshold means on the bundle's validation data: sensitivity and
specificity read from the ROC table stored in the bundle's manifest (out-of-fold predictions)."""

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
        "n": (manifest.get("metrics") or {}).get("oof", {}).get("n"),
        "data": (manifest.get("metrics") or {}).get("data"),
    }
