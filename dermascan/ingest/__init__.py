"""Ingest: the one place that turns bytes into studies. Images, metadata records, manifests (CSV,
ZIP, ISIC-2024 folders), JSON records, DICOM datasets and streamed multipart bodies.

Each parser turns its input into :class:`dermascan.ingest.types.StudyInput` items and row-level
:class:`~dermascan.ingest.errors.Rejection` reasons; nothing here touches the database, the queue,
submission, the web or the worker (``tests/test_project.py`` checks). A new way in adds its
parser here and calls ``dermascan.intake.submission.submit`` with what it returns.
"""
