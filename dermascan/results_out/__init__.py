"""Results out: every way a result leaves DermaScan — the DICOM objects filed back in the source
study (``dicom_sr``: the AI result as a TID 1500 SR, the heat map as a Secondary Capture, the
specialist's decision as a verified SR; ``objects`` builds them for a study), FHIR R4
DiagnosticReports (``fhir``), a whole batch's results as one streamed download (``export``),
signed completion callbacks (``callbacks``) and the PACS destinations with their deliveries
(``destinations``, ``scheduling``, ``delivery``, ``delivery_status`` and the DIMSE / STOW-RS
``transports``), all retried under one policy (``retry``). A new outbound channel goes here. It
reads ``screening``'s results; it imports no other side room."""
