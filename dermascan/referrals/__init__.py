"""Referrals: the specialists' side of a result — the referral queue (``queue``: tiers and order,
claiming the top case, claims that expire, decisions, queue statistics), the case file a specialist's
case page shows (``case``) and outcomes (``outcomes``:
what histopathology found, or that a lesion was not biopsied, recorded per study or imported from
a CSV, all rows or none). It reads what ``screening`` wrote; it imports no other side room."""
