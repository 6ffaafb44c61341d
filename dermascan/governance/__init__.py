"""Governance: how the deployment watches its model — the database states of model bundles
(``bundles``: registered, active, shadow, retired; the file format itself is ``model/inference/bundle.py``),
the operating point an admin may move (``operating_point``), a program's own threshold from its
local validation (``local_validation``), monitoring per program and week
(``monitoring``: referral rate, PPV against outcomes, drift of scores, metadata and images, shadow
comparison), the monthly governance report (``report``) and its pictures (``charts``). A new
monitoring figure goes in ``monitoring``. It imports no other side room."""
