"""Ingest parsing: images, metadata records, manifests (CSV, ZIP, ISIC-2024 folders) and DICOM.

Each parser turns its input into :class:`dermascan.screening.StudyInput` items or row-level
:class:`Rejection` reasons; nothing here touches the database or the queue.
"""
