"""Results out: every way a result leaves DermaScan — the DICOM objects filed back in the source
study (``dicom_sr``: the AI result as a TID 1500 SR, the heat map as a Secondary Capture, the
specialist's decision as a verified SR), FHIR R4 DiagnosticReports (``fhir``), signed completion
callbacks (``callbacks``) and the PACS destinations with their deliveries (``delivery``:
destinations, scheduling, status and the DIMSE / STOW-RS transports). A new outbound channel goes
here. It reads ``screening``'s results; it imports no other side room."""
