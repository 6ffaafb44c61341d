"""Intake: the one path from parsed input to stored, queued studies. ``submission`` stores what a
door parsed (blob first, then the Study rows, the Batch and its upload audit event in one
transaction, idempotency replay by key) and enqueues the ids after the commit; ``lesions`` says
which lesion each study images (one patient per lesion, a keyed pseudonym); ``dicom_scp`` is the
DIMSE C-STORE receiver, a door like the portal's upload, the REST API and STOW-RS, whose parsing
lives in ``dermascan.ingest`` beside it. It imports no other side room."""
