"""Screening: what a score means for a study — writing a batch's predictions, statuses and
referrals in one transaction (``results``: claim, record, idempotent per study and bundle
version), the one referral rule (``referral_policy``: which category a prediction puts a study in),
lesion follow-up (``follow_up``: each visit against the lesion's previous one) and reading results
back as rows, summaries and CSV (``reports``). The side rooms (intake, referrals, results_out,
governance) read and format what this room writes; it imports none of them."""
