"""The referral rule, in one place: whether a scored study goes to the specialists, in which
category, and at what priority tier. The worker, the result writer and the reports call it.

- An image the gate could not assess (``assessable`` False) is never cleared by its probability:
  it goes to the queue as ``not_assessable`` ("check the image"), after the high-risk tiers.
- An assessable image is referred as ``high_risk`` when its calibrated probability is at or
  above the bundle's threshold; tier 1 from 0.75, tier 2 from 0.5, tier 3 below.
"""

from __future__ import annotations

from dataclasses import dataclass

HIGH_RISK = "high_risk"
NOT_ASSESSABLE = "not_assessable"
CATEGORY_LABELS = {HIGH_RISK: "high risk", NOT_ASSESSABLE: "not assessable — check the image"}

# Referral priority tiers: 1 is seen first. Probabilities at or above these bounds.
TIERS = ((0.75, 1), (0.5, 2))
NOT_ASSESSABLE_TIER = 3


def tier_for(probability: float) -> int:
    for bound, tier in TIERS:
        if probability >= bound:
            return tier
    return 3


@dataclass(frozen=True)
class Referral:
    category: str
    tier: int


def decide(probability: float, threshold: float, assessable: bool = True) -> Referral | None:
    """The referral a scored study gets, or None when it is cleared."""
    if not assessable:
        return Referral(NOT_ASSESSABLE, NOT_ASSESSABLE_TIER)
    if probability >= threshold:
        return Referral(HIGH_RISK, tier_for(probability))
    return None
