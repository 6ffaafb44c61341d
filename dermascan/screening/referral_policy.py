"""The referral rule, in one place: whether a scored study goes to the specialists, in which
category, and at what priority tier. The worker, the result writer and the reports call it.

Tiers (0 is seen first; a study without a lesion id gets exactly the tiers it always did):

0. ``newly_high_risk`` — at or above the bundle's threshold now, and the same lesion's previous
   visit was assessed and *not* referred (lesion follow-up: evolution to high risk);
1. to 3. ``high_risk`` — an assessable image at or above the threshold: tier 1 from 0.75, tier 2
   from 0.5, tier 3 below;
3. ``not_assessable`` — an image the gate could not assess is never cleared by its probability:
   a person checks the image (after the high-risk tiers, as before);
4. ``changed`` — "changed since last visit": below the threshold, but the lesion's image moved
   beyond the change measure's threshold since its previous visit (``model.inference.change``: at most 5 %
   of unchanged same-lesion pairs go beyond it).
"""

from __future__ import annotations

from dataclasses import dataclass

NEWLY_HIGH_RISK = "newly_high_risk"
HIGH_RISK = "high_risk"
CHANGED = "changed"
NOT_ASSESSABLE = "not_assessable"
CATEGORY_LABELS = {
    NEWLY_HIGH_RISK: "newly high risk (not referred at the last visit)",
    HIGH_RISK: "high risk",
    CHANGED: "changed since last visit",
    NOT_ASSESSABLE: "not assessable — check the image",
}
# the categories that are referred for their probability (they get heat maps)
BY_PROBABILITY = (NEWLY_HIGH_RISK, HIGH_RISK)

# High-risk tiers: probabilities at or above these bounds.
TIERS = ((0.75, 1), (0.5, 2))
NEWLY_HIGH_RISK_TIER = 0
LOW_HIGH_RISK_TIER = 3
NOT_ASSESSABLE_TIER = 3
CHANGED_TIER = 4


def tier_for(probability: float) -> int:
    for bound, tier in TIERS:
        if probability >= bound:
            return tier
    return LOW_HIGH_RISK_TIER


@dataclass(frozen=True)
class Referral:
    category: str
    tier: int


def decide(
    probability: float,
    threshold: float,
    assessable: bool = True,
    newly_high_risk: bool | None = None,
    changed: bool | None = None,
) -> Referral | None:
    """The referral a scored study gets, or None when it is cleared. ``newly_high_risk`` and
    ``changed``: the comparison with the lesion's previous visit (None: no previous visit, or
    nothing to compare)."""
    if not assessable:
        return Referral(NOT_ASSESSABLE, NOT_ASSESSABLE_TIER)
    if probability >= threshold:
        if newly_high_risk:
            return Referral(NEWLY_HIGH_RISK, NEWLY_HIGH_RISK_TIER)
        return Referral(HIGH_RISK, tier_for(probability))
    if changed:
        return Referral(CHANGED, CHANGED_TIER)
    return None


# each tier and what it holds, for the queue page
# (the not-assessable images share tier 3 and are counted apart)
TIER_LABELS = (
    (NEWLY_HIGH_RISK_TIER, "newly high risk"),
    (1, "high risk, probability 0.75 and above"),
    (2, "high risk, 0.5 to 0.75"),
    (LOW_HIGH_RISK_TIER, "high risk, below 0.5"),
    (CHANGED_TIER, "changed since last visit"),
)
