"""Ingest: the one place that turns bytes into studies. Images, metadata records, manifests (CSV,
ZIP, ISIC-2024 folders), JSON records, DICOM datasets and streamed multipart bodies.

- ``types``: ``StudyInput``, what every parser produces; ``errors``: ``Rejection``, a row's reason
- ``images``: an image checked at the door (format, size, pixels)
- ``records``: the metadata rules (age, sex, site and their aliases)
- ``numbers``: the one way an outside number becomes a Python number
- ``follow_up``: a study's lesion and when it was imaged
- ``edge_results``: a result the edge scorer made offline, uploaded with its study
- ``manifest``: CSV, ZIP and ISIC-2024 folders; ``json_records``: the REST API's JSON records
- ``dicom``: DICOM datasets (header metadata, pixel data); ``multipart``: streamed multipart bodies

Each parser turns its input into :class:`dermascan.ingest.types.StudyInput` items and row-level
:class:`~dermascan.ingest.errors.Rejection` reasons; nothing here touches the database, the queue,
submission, the web or the worker (``tests/test_project.py`` checks). A new way in adds its
parser here and calls ``dermascan.intake.submission.submit`` with what it returns.
"""
